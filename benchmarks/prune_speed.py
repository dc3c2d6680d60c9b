"""Benchmark: prune zoo models to a FLOPs (or latency) budget and measure the CPU latency they gain.

For each model: capture, prune to `--budget` of its FLOPs or, with `--cost latency`, of its per-node
latency model (tri-level, `--scorer`, no recovery: speed does not depend on the weights), check the
pruned model runs, recaptures and survives an artifact round trip bit for bit, and time a forward
before and after (median of `--repeats`).

Run: .venv/bin/python benchmarks/prune_speed.py [--models dit-s,sd15-unet --budget 0.5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("FXPRESS_QUIET", "1")

import torch  # noqa: E402

import fxpress  # noqa: E402
from fxpress.frontends import zoo  # noqa: E402
from fxpress.frontends.calibration import spread_timesteps  # noqa: E402
from fxpress.frontends.capture import capture  # noqa: E402
from fxpress.ir.graph import output_tensors  # noqa: E402
from fxpress.passes.module_edit import timestep_input  # noqa: E402
from fxpress.passes.prune.costs import build_cost_model  # noqa: E402
from fxpress.passes.prune.schedule import PruneConfig  # noqa: E402
from fxpress.passes.prune.trilevel import TriLevelPrune, measure_latency  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="dit-s,sd15-unet")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--cost", default="flops", choices=("flops", "latency", "params"),
                        help="what the budget counts")
    parser.add_argument("--scorer", default="magnitude", choices=("kd", "magnitude", "random"))
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
        config = PruneConfig(args.cost, args.budget, args.scorer, channel_group=args.channel_group, rounds=args.rounds)
        result = TriLevelPrune(config, latency_repeats=args.repeats).run(graph)
        seconds = time.perf_counter() - start
        pruned = result.graph
        flops = build_cost_model(pruned, "flops").total / build_cost_model(graph, "flops").total
        with tempfile.TemporaryDirectory() as tmp:
            fxpress.save(pruned, f"{tmp}/a", plot=False)
            loaded = fxpress.load(f"{tmp}/a")
            same = all(torch.equal(a, b) for a, b in zip(output_tensors(loaded(**example.kwargs)),
                                                         output_tensors(pruned.module(**example.kwargs))))
        before = measure_latency(model, graph.example, args.repeats)
        after = measure_latency(pruned.module, graph.example, args.repeats)
        rows.append((name, result.report, flops, before, after, same, seconds))
        print(name, result.report["removed"], f"flops {flops:.3f}", f"{before:.3f}s -> {after:.3f}s", flush=True)
    print(f"\nbudget {args.cost}={args.budget}, scorer {args.scorer}, {args.rounds} rounds; latency: median of "
          f"{args.repeats} forwards of the zoo example inputs on this CPU ({torch.get_num_threads()} threads)")
    print("| model | params before → after | FLOPs kept | removed (blocks/heads/channel groups) | latency before | "
          "latency after | speed-up | artifact round trip | prune seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rep, flops, before, after, same, seconds in rows:
        removed = "/".join(str(rep["removed"].get(k, 0)) for k in ("block", "head", "channel"))
        print(f"| {name} | {rep['params_before']:,} → {rep['params_after']:,} | {flops:.1%} | {removed} | "
              f"{before * 1e3:.1f} ms | {after * 1e3:.1f} ms | {before / after:.2f}x | "
              f"{'bit-exact' if same else 'DIFFERS'} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
