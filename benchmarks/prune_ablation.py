"""Benchmark: tri-level pruning of the trained digits DiT at half its measured CPU latency.

Every row prunes the same trained DiT (testbed-digits-dit) to the same latency budget with the
same schedule, recovers with the same KD recovery, and is sampled on the same prompts and seeds:

  KD-guided tri-level (blocks + heads + channel groups)  vs  magnitude  vs  random scoring
  KD-guided at one level only: blocks, heads, or channels

The latency of each pruned model is measured end to end (median forward, batch 2) next to the
unpruned model's, so rows are compared at (nearly) equal measured latency.

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
from fxpress.passes.prune.schedule import PruneConfig  # noqa: E402
from fxpress.passes.prune.trilevel import TriLevelPrune, measure_latency  # noqa: E402
from fxpress.testbed.models import load_testbed  # noqa: E402
from fxpress.testbed.quality import evaluate  # noqa: E402

ROWS = [
    ("KD tri-level", "kd", ("block", "head", "channel")),
    ("magnitude tri-level", "magnitude", ("block", "head", "channel")),
    ("random tri-level", "random", ("block", "head", "channel")),
    ("KD blocks only", "kd", ("block",)),
    ("KD heads only", "kd", ("head",)),
    ("KD channels only", "kd", ("channel",)),
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
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--per-prompt", type=int, default=30)
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (0-based), default all")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    entry = zoo.get(args.model)
    testbed = load_testbed(entry.testbed)
    data = entry.training_data()
    model = entry.build()
    example = entry.example_inputs()
    torch.set_grad_enabled(False)
    base_latency = measure_latency(model, Inputs((), example.kwargs), 20)
    base, _ = evaluate(testbed, model, per_prompt=args.per_prompt)
    table = [("unpruned", base_latency, sum(p.numel() for p in model.parameters()), base, {}, 0.0)]
    picked = range(len(ROWS)) if args.rows is None else [int(r) for r in args.rows.split(",")]
    for i in picked:
        label, scorer, levels = ROWS[i]
        start = time.perf_counter()
        graph = capture(model, (), example.kwargs)
        graph.calibration = [Inputs((), c.kwargs) for c in entry.calibration_inputs(4)]
        graph.training_data = data
        config = PruneConfig(args.cost, args.budget, scorer, levels, args.channel_group, args.rounds,
                             rank_by=args.rank_by)
        try:
            with torch.enable_grad():
                result = TriLevelPrune(config, recovery_steps=args.recovery, batch=args.batch).run(graph)
        except PassError as err:  # one level alone may not reach the budget
            table.append((label, None, None, None, {}, time.perf_counter() - start))
            print(f"{label}: {err}", flush=True)
            continue
        pruned = result.graph.module
        latency = measure_latency(pruned, Inputs((), example.kwargs), 20)
        quality, _ = evaluate(testbed, pruned, per_prompt=args.per_prompt)
        params = sum(p.numel() for p in pruned.parameters())
        table.append((label, latency, params, quality, result.report["removed"], time.perf_counter() - start))
        print(f"{label}: {latency * 1e3:.2f} ms, acc {quality.accuracy:.3f}, FD {quality.frechet:.2f}", flush=True)

    print(f"\n{args.model}, budget {args.cost}={args.budget}, {args.rounds} rounds, KD recovery {args.recovery} steps "
          f"(batch {args.batch}); {args.per_prompt} samples per prompt, DDIM {testbed.spec.sample_steps} steps, "
          f"CFG {testbed.spec.guidance}; latency: median forward at batch 2 on this CPU")
    print("| model | latency ms | speed-up | params | removed (blocks/heads/channel groups) | sample accuracy "
          "| Fréchet distance | denoising MSE | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, latency, params, q, removed, seconds in table:
        if latency is None:
            print(f"| {label} | budget not reachable at this level | - | - | - | - | - | - | {seconds:.0f} |")
            continue
        parts = "/".join(str(removed.get(k, 0)) for k in ("block", "head", "channel")) if removed else "-"
        print(f"| {label} | {latency * 1e3:.2f} | {base_latency / latency:.2f}x | {params:,} | {parts} | "
              f"{q.accuracy:.1%} | {q.frechet:.2f} | {q.denoise_mse:.5f} | {seconds:.0f} |")
    if args.json:
        args.json.write_text(json.dumps([{"model": r[0], "latency_s": r[1], "params": r[2], "removed": r[4],
                                          "quality": r[3].to_json() if r[3] else None} for r in table], indent=1))


if __name__ == "__main__":
    main()
