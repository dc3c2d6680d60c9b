"""On tiny-unet at equal artifact size, mixed precision beats uniform 2-bit min-max by a wide margin.

Both artifacts use fixed-rate (radix) storage, so size follows log2(levels). With entropy-coded
storage the min-max baseline's codes, mostly zeros, shrink to about 1.1 bits per weight, below
what any ALS grid stores; that comparison is reported by benchmarks/equal_size.py.
"""

from __future__ import annotations

import torch

import fxpress
from fxpress.ir.graph import output_tensors
from fxpress.passes.pipeline import relative_error


def _error(model, result, inputs):
    with torch.no_grad():
        return relative_error([output_tensors(model(**i.kwargs)) for i in inputs],
                              [output_tensors(result.model(**i.kwargs)) for i in inputs])


def test_mixed_precision_beats_uniform_two_bit_at_equal_size(tiny_unet, tmp_path):
    from fxpress.frontends import zoo

    model, example = tiny_unet
    inputs = zoo.get("tiny-unet").calibration_inputs(6, seed=11)  # held out from calibration
    uniform = fxpress.compress(model, example, "uniform", bits=2, grid="plain", scale_init="minmax", codec="radix")
    size = fxpress.save(uniform, tmp_path / "uniform", plot=False)["bytes"]
    mixed = fxpress.compress(model, example, "bitsfusion", budget_bytes=size, cache_time_embedding=False,
                             codec="radix", sensitivity="hybrid", calibration=2)
    mixed_size = fxpress.save(mixed, tmp_path / "mixed", plot=False)["bytes"]
    assert mixed_size <= size
    e_uniform, e_mixed = _error(model, uniform, inputs), _error(model, mixed, inputs)
    print(f"uniform 2-bit min-max: {e_uniform:.4f} ({size} B); mixed: {e_mixed:.4f} ({mixed_size} B)")
    assert e_mixed <= 0.7 * e_uniform


def test_compressed_default_report(tiny_compressed):
    summary = tiny_compressed.summary
    assert 1.98 <= summary["weights_only_bits"] <= 1.99
    names = [p.name for p in tiny_compressed.report.passes]
    assert names == ["CacheTimeEmbedding", "SelectLayers", "MeasureSensitivity", "AllocateBits",
                     "QuantizeWeights", "RoundToStorage"]
    cache = tiny_compressed.report.passes[0]  # tiny: a 1000-row table would outweigh the MLP 6x
    assert not cache.modified and "time_embedding" in cache.details["skipped"]
