"""Benchmark: prune zoo models to a FLOPs (or latency) budget and measure the CPU latency they gain.

For each model: capture, prune to `--budget` of its FLOPs or, with `--cost latency`, of its per-node
latency model (tri-level, `--scorer`, no recovery: speed does not depend on the weights), check the
pruned model runs, recaptures and survives an artifact round trip bit for bit, and time a forward
before and after (median of `--repeats`, the two models taking turns).

Pruning always runs on the CPU; `--device cuda --dtype float16` times the before/after models on a GPU
instead (the latency model that ranks candidates is still this CPU's, unless `--rank-by flops`).

Run: .venv/bin/python benchmarks/prune_speed.py [--models dit-s,sd15-unet --budget 0.5 --rank-by latency]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

os.environ.setdefault("FXPRESS_QUIET", "1")

import torch  # noqa: E402

import fxpress  # noqa: E402
from fxpress.frontends import zoo  # noqa: E402
from fxpress.frontends.calibration import spread_timesteps  # noqa: E402
from fxpress.frontends.capture import capture  # noqa: E402
from fxpress.ir.graph import Inputs, output_tensors  # noqa: E402
from fxpress.passes.module_edit import timestep_input  # noqa: E402
from fxpress.passes.prune.costs import build_cost_model, latencies_in_turns  # noqa: E402
from fxpress.passes.prune.schedule import PruneConfig  # noqa: E402
from fxpress.passes.prune.trilevel import TriLevelPrune  # noqa: E402


def _latencies(models: list[torch.nn.Module], example: Inputs, args: argparse.Namespace,
               size: int) -> list[float]:
    """Median forward time of a copy of each model on `--device` in `--dtype` at batch `size` (0: as
    given); the models take turns, one forward each per repeat, so drift of the machine hits all alike."""
    dtype = getattr(torch, args.dtype)
    tiled = example.with_batch(size) if size else example

    def place(value: object) -> object:
        if not torch.is_tensor(value):
            return value
        return value.to(args.device, dtype if value.is_floating_point() else value.dtype)

    inputs = Inputs((), {k: place(v) for k, v in tiled.kwargs.items()})
    moved = [copy.deepcopy(m).to(args.device, dtype) for m in models]
    return latencies_in_turns(moved, inputs, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="dit-s,sd15-unet")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--cost", default="flops", choices=("flops", "latency", "params"),
                        help="what the budget counts")
    parser.add_argument("--rank-by", default="", choices=("", "flops", "latency", "params"),
                        help="rank candidates by score per saved ... (default: the budget's cost)")
    parser.add_argument("--scorer", default="magnitude", choices=("kd", "magnitude", "random"))
    parser.add_argument("--device", default="cpu", help="where the before/after latency is measured")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--batch", default="0", help="comma-separated batch sizes to time at (0: the example's)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--channel-group", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    for name in args.models.split(","):
        entry = zoo.get(name)
        model, example = entry.build(), entry.example_inputs()
        start = time.perf_counter()
        graph = capture(model, example.args, example.kwargs)
        t_name = timestep_input(graph.input_names)
        graph.calibration = spread_timesteps(graph.example, t_name, 2) if t_name else [graph.example]
        config = PruneConfig(args.cost, args.budget, args.scorer, rank_by=args.rank_by,
                             channel_group=args.channel_group, rounds=args.rounds, latency_repeats=args.repeats)
        result = TriLevelPrune(config, latency_repeats=args.repeats).run(graph)
        seconds = time.perf_counter() - start
        pruned = result.graph
        flops = build_cost_model(pruned, "flops").total / build_cost_model(graph, "flops").total
        with tempfile.TemporaryDirectory() as tmp:
            fxpress.save(pruned, f"{tmp}/a", plot=False)
            loaded = fxpress.load(f"{tmp}/a")
            same = all(torch.equal(a, b) for a, b in zip(output_tensors(loaded(**example.kwargs)),
                                                         output_tensors(pruned.module(**example.kwargs))))
        for size in (int(b) for b in args.batch.split(",")):
            before, after = _latencies([model, pruned.module], graph.example, args, size)
            rows.append((name, size or "as given", result.report, flops, before, after, same, seconds))
            print(name, size, result.report["removed"], f"flops {flops:.3f}", f"{before:.4f}s -> {after:.4f}s",
                  flush=True)
    where = (f"this CPU ({torch.get_num_threads()} threads)" if args.device == "cpu"
             else torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device)
    print(f"\nbudget {args.cost}={args.budget}, ranked by {args.rank_by or args.cost}, scorer {args.scorer}, "
          f"{args.rounds} rounds; latency: median of {args.repeats} forwards (models taking turns) of the zoo "
          f"example inputs "
          f"(tiled to the batch shown), {args.dtype}, on {where}")
    print("| model | batch | params before → after | FLOPs kept | removed (blocks/heads/channel groups) | "
          "latency before | latency after | speed-up | artifact round trip | prune seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, size, rep, flops, before, after, same, seconds in rows:
        removed = "/".join(str(rep["removed"].get(k, 0)) for k in ("block", "head", "channel"))
        print(f"| {name} | {size} | {rep['params_before']:,} → {rep['params_after']:,} | {flops:.1%} | {removed} | "
              f"{before * 1e3:.1f} ms | {after * 1e3:.1f} ms | {before / after:.2f}x | "
              f"{'bit-exact' if same else 'DIFFERS'} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
