"""Scales fitted once (by MeasureSensitivity) and reused by QuantizeWeights while the weight is unchanged."""

from __future__ import annotations

import torch

from fxpress.ir.annotations import QuantSpec
from fxpress.ir.graph import Graph

STORE = "fitted_scales"


def remember_scale(graph: Graph, path: str, spec: QuantSpec, scale: torch.Tensor) -> None:
    """Keep `scale` for layer `path` and `spec`, tagged with the weight tensor it was fitted on."""
    weight = graph.module.get_submodule(path).weight
    graph.extras.setdefault(STORE, {})[path, spec.key, spec.scale_init] = (weight.data_ptr(), weight._version, scale)


def recall_scale(graph: Graph, path: str, spec: QuantSpec) -> torch.Tensor | None:
    """Return the remembered scale if the layer's weight is still the one it was fitted on, else None."""
    entry = graph.extras.get(STORE, {}).get((path, spec.key, spec.scale_init))
    weight = graph.module.get_submodule(path).weight
    if entry and entry[:2] == (weight.data_ptr(), weight._version):
        return entry[2]
    return None


def forget_scales(graph: Graph) -> None:
    """Drop every remembered scale."""
    graph.extras.pop(STORE, None)
