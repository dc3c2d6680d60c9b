"""Benchmark: candidate storage codecs for weight codes, bits per weight and speed.

Codes come from ALS-quantizing bell-shaped weights (the zoo's 'trained-like' init) at each grid.
Run: .venv/bin/python benchmarks/entropy_coders.py
"""

from __future__ import annotations

import lzma
import math
import time

import numpy as np
import torch

from fxpress.ir.annotations import QuantSpec
from fxpress.kernels import entropy
from fxpress.kernels.packing import pack_radix
from fxpress.passes.quant.scale_init import fit_scales, quantize_rows


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(rows: int = 1280, cols: int = 4096) -> None:
    import zstandard

    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02
    print(f"{rows}x{cols} weights ({rows * cols / 1e6:.1f} M), normal law, ALS scales per row\n")
    print("| grid | log2 L | entropy | rANS (constriction) | radix words | zstd-19 on bytes | lzma on radix |"
          " rANS enc / dec M/s |")
    print("|---|---|---|---|---|---|---|---|")
    for key in ("b1", "b2", "p2", "b3", "p3", "b4", "p4", "p8"):
        spec = QuantSpec.from_key(key)
        codes = (quantize_rows(weight, fit_scales(weight, spec), spec) - spec.qmin).numpy().astype(np.int32)
        flat = codes.reshape(-1)
        n = flat.size
        (words, counts), t_enc = _timed(lambda flat=flat, spec=spec: entropy.encode(flat, spec.levels))
        decoded, t_dec = _timed(lambda words=words, counts=counts: entropy.decode(words, counts))
        assert np.array_equal(decoded, flat)
        radix = pack_radix(flat, spec.levels)
        zstd = zstandard.ZstdCompressor(level=19).compress(flat.astype(np.uint8).tobytes())
        xz = lzma.compress(radix.tobytes(), preset=6)
        print(f"| {key} ({spec.levels} levels) | {math.log2(spec.levels):.3f} | {entropy.entropy_bits(counts):.3f} | "
              f"{words.nbytes * 8 / n:.3f} | {radix.nbytes * 8 / n:.3f} | {len(zstd) * 8 / n:.3f} | "
              f"{len(xz) * 8 / n:.3f} | {n / t_enc / 1e6:.0f} / {n / t_dec / 1e6:.0f} |")


if __name__ == "__main__":
    main()
