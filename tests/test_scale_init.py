"""Alternating least squares never loses to min-max, and its error model matches the real error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxpress.ir.annotations import QuantSpec
from fxpress.passes.quant.scale_init import SortedRows, fit_scales, l2_error, minmax_scales, quantize_rows

KEYS = ("b1", "b2", "p2", "b3", "p3", "b4", "p4", "p8")


def _error(w2d, scale, spec):
    deq = quantize_rows(w2d, scale, spec).float() * scale.float().unsqueeze(1)
    return (deq - w2d).pow(2).sum(dim=1)


def test_als_never_worse_than_minmax_on_any_layer(tiny_unet):
    model, _ = tiny_unet
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        w2d = module.weight.detach().reshape(module.weight.shape[0], -1)
        rows = SortedRows.of(w2d)
        for key in KEYS:
            als = fit_scales(w2d, QuantSpec.from_key(key), rows)
            mm = fit_scales(w2d, QuantSpec.from_key(key, scale_init="minmax"), rows)
            e_als, e_mm = _error(w2d, als, QuantSpec.from_key(key)), _error(w2d, mm, QuantSpec.from_key(key))
            assert e_als.sum() <= e_mm.sum() * (1 + 1e-6), (name, key)
            assert bool((e_als <= e_mm * (1 + 1e-5) + 1e-12).all()), (name, key)


@pytest.mark.parametrize("key", KEYS)
def test_sorted_error_model_matches_elementwise(key):
    spec = QuantSpec.from_key(key)
    w = torch.randn(16, 300, generator=torch.Generator().manual_seed(0))
    scale = minmax_scales(w, spec) * 0.7
    predicted = l2_error(SortedRows.of(w), scale, spec)
    assert torch.allclose(predicted.float(), _error(w, scale, spec), rtol=1e-4, atol=1e-6)


def test_als_improves_a_lot_at_low_bits():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec.from_key("b1")
    als = fit_scales(w, spec)
    mm = fit_scales(w, QuantSpec.from_key("b1", scale_init="minmax"))
    assert _error(w, als, spec).sum() < 0.5 * _error(w, mm, spec).sum()


def test_balanced_grid_beats_plain_at_same_width():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(2))
    for bits in (2, 3):
        b, p = QuantSpec(bits, "balanced"), QuantSpec(bits, "plain")
        assert _error(w, fit_scales(w, b), b).sum() < _error(w, fit_scales(w, p), p).sum()


@pytest.mark.parametrize("key", KEYS)
def test_level_counts_match_the_codes(key):
    from fxpress.passes.quant.scale_init import level_counts

    spec = QuantSpec.from_key(key)
    w = torch.randn(8, 257, generator=torch.Generator().manual_seed(3))
    scale = fit_scales(w, spec)
    codes = quantize_rows(w, scale, spec).reshape(-1) - spec.qmin
    counts = level_counts(SortedRows.of(w), scale.float(), spec)
    assert torch.equal(counts, torch.bincount(codes, minlength=spec.levels))
