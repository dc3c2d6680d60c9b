"""Calibration inputs for diffusion models: the example inputs at timesteps spread over the schedule."""

from __future__ import annotations

import torch

from fxpress.ir.graph import Inputs


def spread_timesteps(example: Inputs, name: str, count: int, num_train_timesteps: int = 1000) -> list[Inputs]:
    """Return `count` copies of `example` whose `name` kwarg takes evenly spread timesteps.

    Inputs without that keyword (or with a non-tensor value) are returned once, unchanged.
    """
    value = example.kwargs.get(name)
    if not isinstance(value, torch.Tensor) or count <= 1:
        return [example]
    out = []
    for i in range(count):
        t = int((i + 0.5) * num_train_timesteps / count)
        out.append(Inputs(example.args, {**example.kwargs, name: torch.full_like(value, t)}))
    return out
