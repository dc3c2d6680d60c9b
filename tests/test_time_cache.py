"""The time-embedding cache is bit-exact and refuses timesteps outside its grid."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import FxpressError
from fxpress.ir.graph import output_tensors
from fxpress.kernels.timestep_table import TimestepTable
from fxpress.passes.quant.time_cache import CacheTimeEmbedding


def test_cache_is_bit_exact_across_timesteps(tiny_unet):
    model, example = tiny_unet
    graph = fxpress.capture(model, example.args, example.kwargs)
    cached, report = fxpress.Pipeline([CacheTimeEmbedding()]).run(graph)
    assert list(report.passes[0].details["cached"]) == ["time_embedding"]
    assert isinstance(cached.module.time_embedding, TimestepTable)
    for t in (0, 1, 417, 999):
        kwargs = {**example.kwargs, "timestep": torch.tensor([t, t])}
        ref = output_tensors(model(**kwargs))[0]
        assert torch.equal(output_tensors(cached.module(**kwargs))[0], ref)
    scalar = {**example.kwargs, "timestep": 250}
    assert torch.equal(output_tensors(cached.module(**scalar))[0], output_tensors(model(**scalar))[0])


def test_timestep_outside_grid_is_refused(tiny_unet):
    model, example = tiny_unet
    graph = fxpress.capture(model, example.args, example.kwargs)
    cached, _ = fxpress.Pipeline([CacheTimeEmbedding(timesteps=list(range(0, 1000, 20)))]).run(graph)
    with pytest.raises(FxpressError, match="not in the cached grid"):
        cached.module(**{**example.kwargs, "timestep": torch.tensor([13, 13])})


def test_models_without_timestep_are_skipped():
    from fxpress.frontends import zoo

    entry = zoo.get("clip-text")
    example = entry.example_inputs()
    graph = fxpress.capture(entry.build(), example.args, example.kwargs)
    _, report = fxpress.Pipeline([CacheTimeEmbedding()]).run(graph)
    assert not report.passes[0].modified and "skipped" in report.passes[0].details
