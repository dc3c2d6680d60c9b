"""What a backend can be handed: an artifact directory, a Graph, a CompressResult, or a module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from fxpress.backends.torch_load import load
from fxpress.errors import LoweringError
from fxpress.ir.graph import Graph


def as_module(target: Any, model: Any = None) -> nn.Module:
    """Return the model `target` stands for; artifact directories are loaded (`model=` as in fxpress.load)."""
    if isinstance(target, (str, Path)):
        return load(target, model=model)
    if isinstance(target, Graph):
        return target.module
    if isinstance(getattr(target, "graph", None), Graph):  # a CompressResult
        return target.graph.module
    if isinstance(target, nn.Module):
        return target
    raise LoweringError(f"expected an artifact directory, a Graph, a CompressResult or an nn.Module, "
                        f"not {type(target).__name__}")
