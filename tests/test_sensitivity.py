"""Sensitivity modes: local, hybrid and e2e agree on what matters, and errors fall with more bits."""

from __future__ import annotations

import pytest

import fxpress
from fxpress.frontends.calibration import spread_timesteps
from fxpress.passes.quant.select_layers import SelectLayers
from fxpress.passes.sensitivity import MeasureSensitivity, rank_correlation

OPTIONS = ("b1", "b2", "b4")


@pytest.fixture(scope="module")
def measured(tiny_unet):
    model, example = tiny_unet
    graph = fxpress.capture(model, example.args, example.kwargs)
    graph.calibration = spread_timesteps(graph.example, "timestep", 1)
    passes = [SelectLayers()] + [MeasureSensitivity(m, OPTIONS) for m in ("local", "hybrid", "e2e")]
    graph, report = fxpress.Pipeline(passes).run(graph)
    return graph, report


def test_every_layer_has_all_modes(measured):
    graph, report = measured
    for path, ann in graph.annotations().items():
        if ann.keep_reason:
            continue
        assert set(ann.sensitivity) == {"local", "hybrid", "e2e"}
        e2e = ann.sensitivity["e2e"]
        assert set(e2e.error) == set(OPTIONS) and set(e2e.psnr) == set(OPTIONS)
        assert e2e.error["b4"] < e2e.error["b1"], path
        assert ann.sensitivity["local"].error["b4"] < ann.sensitivity["local"].error["b2"] < \
            ann.sensitivity["local"].error["b1"], path
        assert 0 < ann.code_entropy["b1"] <= 1.585 + 1e-9
    assert report.passes[1].details["seconds"]["measure"] >= 0


def test_modes_rank_layers_alike(measured):
    graph, _ = measured
    assert rank_correlation(graph, "local", "e2e") > 0.5
    assert rank_correlation(graph, "hybrid", "e2e") > rank_correlation(graph, "local", "e2e")
