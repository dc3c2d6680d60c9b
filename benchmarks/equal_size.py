"""Benchmark: mixed precision vs uniform 2-bit min-max at equal artifact size on tiny-unet.

For each storage codec, the uniform artifact's size becomes the mixed recipe's byte budget; errors
are relative output errors on held-out inputs spread over timesteps.
Run: .venv/bin/python benchmarks/equal_size.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("FXPRESS_QUIET", "1")

import torch  # noqa: E402

import fxpress  # noqa: E402
from fxpress.errors import FxpressError  # noqa: E402
from fxpress.frontends import zoo  # noqa: E402
from fxpress.ir.graph import output_tensors  # noqa: E402
from fxpress.passes.pipeline import relative_error  # noqa: E402


def main() -> None:
    entry = zoo.get("tiny-unet")
    model, example = entry.build(), entry.example_inputs()
    held_out = entry.calibration_inputs(6, seed=11)

    def error(result) -> float:
        with torch.no_grad():
            return relative_error([output_tensors(model(**i.kwargs)) for i in held_out],
                                  [output_tensors(result.model(**i.kwargs)) for i in held_out])

    print("| codec | model | artifact bytes | rel. output error | vs uniform | bits (log2 levels) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for codec in ("radix", "rans"):
            uniform = fxpress.compress(model, example, "uniform", bits=2, grid="plain", scale_init="minmax",
                                       codec=codec)
            size = fxpress.save(uniform, Path(tmp) / f"u-{codec}", plot=False)["bytes"]
            base = error(uniform)
            print(f"| {codec} | uniform 2-bit min-max | {size:,} | {base:.4f} | 1.00 | 2.000 |")
            for mode in ("local", "hybrid", "e2e"):
                try:
                    mixed = fxpress.compress(model, example, "bitsfusion", budget_bytes=size, codec=codec,
                                             cache_time_embedding=False, sensitivity=mode, calibration=2)
                except FxpressError as exc:
                    print(f"| {codec} | mixed, {mode} sensitivity | - | - | - | impossible: {str(exc)[:80]} |")
                    continue
                mixed_size = fxpress.save(mixed, Path(tmp) / f"m-{codec}-{mode}", plot=False)["bytes"]
                e = error(mixed)
                print(f"| {codec} | mixed, {mode} sensitivity | {mixed_size:,} | {e:.4f} | {e / base:.2f} | "
                      f"{mixed.summary['weights_only_bits']:.3f} |")


if __name__ == "__main__":
    main()
