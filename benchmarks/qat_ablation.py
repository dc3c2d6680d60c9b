"""Benchmark: BitsFusion's ablation (its Table 4) on the trained digits testbed UNet, at about 2 bits.

Each row adds one ingredient to the one above and is trained with the same budget (stage I then
stage II), then packed into an artifact and sampled on the same prompts and seeds as FP32:

  uniform 2-bit LSQ QAT → + balanced grid → + alternating (ALS) init → + mixed precision (1.99 bits)
  and time-embedding cache → + CFG-aware distillation → + feature distillation → + Beta(3,1) timesteps

Rows 1–4 distil the plain conditional output in stage I (no guidance, no features, uniform t).
Post-training rows (no training) are shown for contrast. Sizes are whole artifact directories
(manifest and tensors; no plot), next to the FP32 model's fp16 size.

Run: .venv/bin/python benchmarks/qat_ablation.py [--stage1 400 --stage2 200 --per-prompt 30]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FXPRESS_QUIET", "1")

import torch  # noqa: E402

import fxpress  # noqa: E402
from fxpress.frontends import zoo  # noqa: E402
from fxpress.testbed.models import load_testbed  # noqa: E402
from fxpress.testbed.quality import evaluate  # noqa: E402

PLAIN_KD = {"cfg_distill": False, "feature_distill": 0.0, "timesteps": "uniform"}
UNIFORM = {"recipe": "uniform", "bits": 2}
MIXED = {"recipe": "bitsfusion", "target_bits": 1.99, "sensitivity": "hybrid"}

ROWS = [
    ("PTQ: uniform 2-bit min-max", {**UNIFORM, "grid": "plain", "scale_init": "minmax"}, None),
    ("PTQ: BitsFusion mixed 1.99-bit", MIXED, None),
    ("1. uniform 2-bit LSQ QAT", {**UNIFORM, "grid": "plain"}, {**PLAIN_KD, "scale_init": "lsq"}),
    ("2. + balanced grid", {**UNIFORM, "grid": "balanced"}, {**PLAIN_KD, "scale_init": "lsq"}),
    ("3. + alternating init", {**UNIFORM, "grid": "balanced", "scale_init": "als"}, PLAIN_KD),
    ("4. + mixed precision, time cache", MIXED, PLAIN_KD),
    ("5. + CFG-aware distillation", MIXED, {"feature_distill": 0.0, "timesteps": "uniform"}),
    ("6. + feature distillation", MIXED, {"timesteps": "uniform"}),
    ("7. + Beta(3,1) timesteps (full)", MIXED, {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage1", type=int, default=400)
    parser.add_argument("--stage2", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--per-prompt", type=int, default=30)
    parser.add_argument("--rows", default=None, help="comma-separated row numbers to run (0-based), default all")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--artifacts", type=Path, default=None, help="keep the artifacts here (default: discard)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    entry = zoo.get("testbed-digits-unet")
    testbed = load_testbed("digits")
    model, example = entry.build(), entry.example_inputs()
    calibration, data = entry.calibration_inputs(4), entry.training_data()
    fp16 = 2 * sum(p.numel() for p in model.parameters())
    rows = []

    def report(label: str, quality, size: int | None, bits: float | None, seconds: float) -> None:
        ratio = f"{fp16 / size:.2f}x" if size else "-"
        row = {"row": label, "accuracy": quality.accuracy, "frechet": quality.frechet,
               "denoise_mse": quality.denoise_mse, "bytes": size, "bits": bits, "seconds": round(seconds)}
        rows.append(row)
        print(f"| {label} | {quality.accuracy:.1%} | {quality.frechet:.3f} | {quality.denoise_mse:.5f} | "
              f"{'-' if bits is None else f'{bits:.3f}'} | {size or fp16:,} | {ratio} | {seconds:.0f} |", flush=True)

    print(f"stage I {args.stage1} steps, stage II {args.stage2} steps, batch {args.batch}; "
          f"{args.per_prompt} samples per prompt, DDIM {testbed.spec.sample_steps} steps, CFG {testbed.spec.guidance}")
    print("| model | sample accuracy | Fréchet distance | denoising MSE | bits (log2 levels) | bytes | "
          "smaller than fp16 | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    report("FP32 (fp16 size)", evaluate(testbed, model, per_prompt=args.per_prompt)[0], None, None,
           time.perf_counter() - start)
    chosen = range(len(ROWS)) if args.rows is None else [int(r) for r in args.rows.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.artifacts or Path(scratch)
        for index in chosen:
            label, recipe, qat = ROWS[index]
            start = time.perf_counter()
            overrides = {k: v for k, v in recipe.items() if k != "recipe"}
            if qat is not None:
                overrides["qat"] = {"stage1_steps": args.stage1, "stage2_steps": args.stage2, "batch": args.batch,
                                    **qat}
            result = fxpress.compress(model, example, recipe["recipe"], calibration_inputs=calibration,
                                      training_data=data if qat is not None else None, verify=False, **overrides)
            size = fxpress.save(result, tmp / f"row{index}", plot=False, overwrite=True)["bytes"]
            quality = evaluate(testbed, fxpress.load(tmp / f"row{index}"), per_prompt=args.per_prompt)[0]
            report(label, quality, size, result.summary["weights_only_bits"], time.perf_counter() - start)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
