"""Describe a model's example inputs in JSON (shape, dtype, value range) and draw fresh ones from it.

Artifacts record the spec of the inputs they were compressed with, so exporters and checks can call
the model later without the user supplying inputs again. Integer inputs (timesteps, token ids) are
drawn inside the range the example used; float inputs from a standard normal law.
"""

from __future__ import annotations

from typing import Any

import torch

from fxpress.errors import ArtifactError
from fxpress.ir.graph import Inputs


def _spec(value: Any) -> dict[str, Any]:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"only tensor inputs can be described, not {type(value).__name__}")
    spec = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if not value.is_floating_point() and value.numel():
        spec.update(low=int(value.min()), high=int(value.max()) + 1)
    return spec


def input_spec(inputs: Inputs) -> dict[str, Any] | None:
    """Return {"args": [...], "kwargs": {...}} describing tensor inputs, or None if any input is not a tensor."""
    try:
        return {"args": [_spec(v) for v in inputs.args], "kwargs": {k: _spec(v) for k, v in inputs.kwargs.items()}}
    except TypeError:
        return None


def _draw(spec: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    dtype = getattr(torch, str(spec.get("dtype")), None)
    if not isinstance(dtype, torch.dtype) or not all(isinstance(s, int) and s >= 0 for s in spec.get("shape", [None])):
        raise ArtifactError(f"input spec {spec!r} names no torch dtype and shape")
    if dtype.is_floating_point:
        return torch.randn(spec["shape"], generator=gen).to(dtype)
    return torch.randint(spec.get("low", 0), spec.get("high", 2), spec["shape"], generator=gen, dtype=dtype)


def inputs_from_spec(spec: dict[str, Any], seed: int = 0) -> Inputs:
    """Draw inputs that match `spec` (as written by input_spec)."""
    gen = torch.Generator().manual_seed(seed)
    return Inputs(tuple(_draw(s, gen) for s in spec.get("args", [])),
                  {k: _draw(s, gen) for k, s in spec.get("kwargs", {}).items()})
