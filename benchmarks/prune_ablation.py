"""Benchmark: tri-level pruning of the trained digits DiT at half its measured CPU latency.

Every row prunes the same trained DiT (testbed-digits-dit) to the same latency budget with the
same schedule, recovers with the same KD recovery, and is sampled on the same prompts and seeds:

  KD-guided tri-level (blocks + heads + channel groups)  vs  magnitude  vs  random scoring
  KD-guided at one level only: blocks, heads, or channels

Latency is timed at batch 64 by default (32 images with classifier-free guidance; the sampler in
`evaluate` runs at 500): at batch 2 this 1M-parameter model spends most of a forward on per-op
overhead, which only removing whole blocks saves, a regime no real-sized model on a phone is in
(`--latency-batch 2` measures it). The latency of every model is measured end to end at the end, all
of them taking turns (median forward), so drift of the machine hits them alike. Blocks are coarse:
block removal alone may land well past the budget, so it is also run one block short of it
(budget + 0.1); tri-level is compared with block removal at latencies on both sides of its own.

Run: .venv/bin/python benchmarks/prune_ablation.py [--budget 0.5 --recovery 300 --per-prompt 30]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("FXPRESS_QUIET", "1")

import torch  # noqa: E402

from fxpress.errors import PassError  # noqa: E402
from fxpress.frontends import zoo  # noqa: E402
from fxpress.frontends.capture import capture  # noqa: E402
from fxpress.ir.graph import Inputs  # noqa: E402
from fxpress.passes.context import PassContext  # noqa: E402
from fxpress.passes.prune.costs import latencies_in_turns  # noqa: E402
from fxpress.passes.prune.schedule import PruneConfig  # noqa: E402
from fxpress.passes.prune.trilevel import TriLevelPrune  # noqa: E402
from fxpress.testbed.models import load_testbed  # noqa: E402
from fxpress.testbed.quality import evaluate  # noqa: E402
from fxpress.testbed.training_data import noisy_inputs  # noqa: E402

TRI = ("block", "head", "channel")
ROWS = [  # label, scorer, levels, budget (None: --budget; a number: --budget plus it)
    ("KD tri-level", "kd", TRI, None),
    ("magnitude tri-level", "magnitude", TRI, None),
    ("random tri-level", "random", TRI, None),
    ("KD blocks only", "kd", ("block",), None),
    ("KD blocks only, one block fewer", "kd", ("block",), 0.1),
    ("KD heads only", "kd", ("head",), None),
    ("KD channels only", "kd", ("channel",), None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="testbed-digits-dit")
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of the latency to keep")
    parser.add_argument("--cost", default="latency", choices=("latency", "flops", "params"))
    parser.add_argument("--rank-by", default="", choices=("", "latency", "flops", "params"),
                        help="rank by score per saved ... (default: the budget's cost)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--channel-group", type=int, default=16)
    parser.add_argument("--recovery", type=int, default=300, help="KD recovery steps after pruning")
    parser.add_argument("--round-recovery", type=int, default=0, help="KD recovery steps between rounds")
    parser.add_argument("--trial-recovery", type=int, default=0,
                        help="KD recovery steps of each round's candidate plans before they are compared (KD rows)")
    parser.add_argument("--latency-repeats", type=int, default=30,
                        help="forwards per model when the scheduler times the model in turns")
    parser.add_argument("--latency-batch", type=int, default=64,
                        help="batch the latency is measured at (the example inputs tiled; 2 = one image with CFG)")
    parser.add_argument("--timing-turns", type=int, default=300, help="forwards per model in the final timing")
    parser.add_argument("--calibration", type=int, default=4, help="calibration inputs (timesteps spread evenly)")
    parser.add_argument("--calibration-batch", type=int, default=2,
                        help="training images per calibration input (KD scores average over all of them)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--per-prompt", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="seeds recovery batches and random scores")
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (0-based), default all")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    entry = zoo.get(args.model)
    testbed = load_testbed(entry.testbed)
    data = entry.training_data()
    model = entry.build()
    example = Inputs.of(entry.example_inputs())
    timed_at = example.with_batch(args.latency_batch)
    torch.set_grad_enabled(False)
    base, _ = evaluate(testbed, model, per_prompt=args.per_prompt)
    table = [("unpruned", model, sum(p.numel() for p in model.parameters()), base, {}, 0.0)]
    picked = range(len(ROWS)) if args.rows is None else [int(r) for r in args.rows.split(",")]
    for i in picked:
        label, scorer, levels, extra = ROWS[i]
        start = time.perf_counter()
        graph = capture(model, (), example.kwargs)
        steps = [int((k + 0.5) * 1000 / args.calibration) for k in range(args.calibration)]
        graph.calibration = [Inputs((), kw) for kw in noisy_inputs(testbed, steps, 1, args.calibration_batch)]
        budget = args.budget + (extra or 0.0)
        config = PruneConfig(args.cost, budget, scorer, levels, args.channel_group, args.rounds,
                             latency_repeats=args.latency_repeats, rank_by=args.rank_by,
                             latency_batch=args.latency_batch, seed=args.seed)
        context = PassContext(training_data=data)
        try:
            with torch.enable_grad():
                result = TriLevelPrune(config, recovery_steps=args.recovery, batch=args.batch,
                                       round_recovery_steps=args.round_recovery,
                                       trial_recovery_steps=args.trial_recovery).run(graph, context)
        except PassError as err:  # one level alone may not reach the budget
            table.append((label, None, None, None, str(err).split(" (pass")[0], time.perf_counter() - start))
            print(f"{label}: {err}", flush=True)
            continue
        pruned = result.graph.module
        quality, _ = evaluate(testbed, pruned, per_prompt=args.per_prompt)
        params = sum(p.numel() for p in pruned.parameters())
        if extra:
            label = f"{label} (budget {budget:g})"
        table.append((label, pruned, params, quality, result.report["removed"], time.perf_counter() - start))
        print(f"{label}: acc {quality.accuracy:.3f}, FD {quality.frechet:.2f}, {result.report['removed']}",
              flush=True)

    timed = [row[1] for row in table if row[1] is not None]
    latencies = dict(zip(map(id, timed), latencies_in_turns(timed, timed_at, args.timing_turns)))
    base_latency = latencies[id(model)]
    other = 2 if args.latency_batch != 2 else 64  # the other regime, for the record
    elsewhere = dict(zip(map(id, timed), latencies_in_turns(timed, example.with_batch(other), args.timing_turns)))

    print(f"\n{args.model}, budget {args.cost}={args.budget}, {args.rounds} rounds, KD recovery {args.recovery} steps "
          f"(batch {args.batch}); {args.per_prompt} samples per prompt, DDIM {testbed.spec.sample_steps} steps, "
          f"CFG {testbed.spec.guidance}; latency: median of {args.timing_turns} forwards at batch {args.latency_batch} "
          f"on this CPU, all models taking turns; round recovery {args.round_recovery} steps, plan trials "
          f"{args.trial_recovery} steps; {args.calibration} calibration inputs of {args.calibration_batch} images; "
          f"seed {args.seed}")
    print(f"| model | latency ms | speed-up | speed-up at batch {other} | params | removed (blocks/heads/channel "
          "groups) | sample accuracy | Fréchet distance | denoising MSE | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, pruned, params, q, removed, seconds in table:
        if pruned is None:
            print(f"| {label} | not reachable at this level ({removed}) | - | - | - | - | - | - | - | {seconds:.0f} |")
            continue
        latency = latencies[id(pruned)]
        parts = "/".join(str(removed.get(k, 0)) for k in ("block", "head", "channel")) if removed else "-"
        print(f"| {label} | {latency * 1e3:.2f} | {base_latency / latency:.2f}x | "
              f"{elsewhere[id(model)] / elsewhere[id(pruned)]:.2f}x | {params:,} | {parts} | "
              f"{q.accuracy:.1%} | {q.frechet:.2f} | {q.denoise_mse:.5f} | {seconds:.0f} |")
    if args.json:
        args.json.write_text(json.dumps([{"model": r[0], "latency_s": latencies.get(id(r[1])),
                                          f"latency_s_batch_{other}": elsewhere.get(id(r[1])), "params": r[2],
                                          "removed": r[4],
                                          "quality": r[3].to_json() if r[3] else None} for r in table], indent=1))


if __name__ == "__main__":
    main()
