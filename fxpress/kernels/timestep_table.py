"""`TimestepTable`: a module replaced by a table of its outputs over a grid of timesteps.

The table's inputs are functions of the timestep, so it reads the timestep itself: a forward
pre-hook on the root model (`TimestepFeeder`) hands the call's timestep to every table first.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from fxpress.errors import FxpressError


class TimestepTable(nn.Module):
    """Returns precomputed outputs `table[i]` for timestep `timesteps[i]`, broadcast to the batch."""

    def __init__(self, timesteps: torch.Tensor, table: torch.Tensor):
        super().__init__()
        self.register_buffer("timesteps", timesteps.clone())
        self.register_buffer("table", table.clone())
        self.feed: dict[str, torch.Tensor] = {}  # filled by TimestepFeeder; a dict, not a tensor attribute

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        current = self.feed.get("timestep")
        if current is None:
            raise FxpressError("TimestepTable called without a timestep: the model's TimestepFeeder "
                               "hook is missing (load the model with fxpress.load)")
        batch = next((a.shape[0] for a in (*args, *kwargs.values())
                      if isinstance(a, torch.Tensor) and a.dim() > 0), 1)
        t = current.reshape(-1).to(self.timesteps.dtype)
        # searchsorted (left) written as a count, which every exporter (ONNX has no searchsorted) can express
        index = (self.timesteps[None, :] < t[:, None]).sum(dim=1).clamp(max=self.timesteps.numel() - 1)
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            if not torch.equal(self.timesteps[index], t):
                raise FxpressError(f"timestep(s) {t.tolist()} are not in the cached grid "
                                   f"({self.timesteps.numel()} values from {self.timesteps[0].item()} "
                                   f"to {self.timesteps[-1].item()})")
        rows = self.table[index]
        return rows.expand(batch, *rows.shape[1:]) if rows.shape[0] == 1 else rows


class TimestepFeeder:
    """Forward pre-hook (with kwargs) that passes the root call's timestep to every TimestepTable."""

    def __init__(self, name: str, position: int | None):
        self.name, self.position = name, position

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.name in kwargs:
            value = kwargs[self.name]
        elif self.position is not None and self.position < len(args):
            value = args[self.position]
        else:
            raise FxpressError(f"the time-cached model needs its {self.name!r} argument")
        t = torch.as_tensor(value)
        for sub in module.modules():
            if isinstance(sub, TimestepTable):
                sub.feed["timestep"] = t


def install_feeder(model: nn.Module, timestep_input: str) -> None:
    """Register the TimestepFeeder hook on `model` for its argument named `timestep_input`."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    position = names.index(timestep_input) if timestep_input in names else None
    if any(isinstance(h, TimestepFeeder) for h in model._forward_pre_hooks.values()):
        return
    model.register_forward_pre_hook(TimestepFeeder(timestep_input, position), with_kwargs=True)
