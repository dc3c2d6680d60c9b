"""Guidance as a model input: a zero-initialised embedding of the guidance weight added to the time embedding.

Guidance distillation (Meng et al.) folds classifier-free guidance into the network: the student takes
the guidance weight w as an input, embedded like the timestep, and learns to give in one call what the
teacher gives in two. `GuidanceConditioned` wraps a model so that it takes the keyword `guidance` and
adds its embedding to the output of one module (the time embedding; `passes.distill.guidance_input`
finds it). The embedding's last layer starts at zero, so a freshly wrapped model is bit-identical to the
original. The artifact loader rebuilds the wrapper from `describe()`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

GUIDANCE_INPUT = "guidance"


class GuidanceEmbedding(nn.Module):
    """w -> sinusoidal features of w * `scale` -> Linear -> SiLU -> Linear (zero-initialised) of `width`."""

    def __init__(self, width: int, features: int = 64, scale: float = 100.0):
        super().__init__()
        self.features, self.scale = features, scale
        self.linear_1 = nn.Linear(features, width)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(width, width)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, guidance: torch.Tensor) -> torch.Tensor:
        half = self.features // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=guidance.device) / half)
        angles = guidance.float().reshape(-1, 1) * self.scale * freqs
        return self.linear_2(self.act(self.linear_1(torch.cat([angles.sin(), angles.cos()], dim=1))))


class _Slot:
    """The guidance of the current call, shared by the wrapper and the embedding site."""

    value: torch.Tensor | None = None


class WithGuidance(nn.Module):
    """Runs the original time-embedding module and adds the guidance embedding of the current call."""

    def __init__(self, inner: nn.Module, embedding: GuidanceEmbedding, slot: _Slot):
        super().__init__()
        self.inner, self.embedding, self.slot = inner, embedding, slot

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.inner(*args, **kwargs)
        w = self.slot.value
        if w is None:
            return out
        return out + self.embedding(w.expand(out.shape[0]) if w.dim() == 0 else w).to(out.dtype)


class GuidanceConditioned(nn.Module):
    """`model` taking one more keyword, `guidance` (a (batch,) or scalar tensor of guidance weights).

    Without it the model runs as before; `site` is the module path the embedding is added to.
    """

    def __init__(self, model: nn.Module, site: str, width: int, features: int = 64, scale: float = 100.0):
        super().__init__()
        self.site, self.settings = site, {"width": width, "features": features, "scale": scale}
        self.model = model
        slot = _Slot()
        self._slot = slot
        parent, _, leaf = site.rpartition(".")
        host = model.get_submodule(parent) if parent else model
        original = getattr(host, leaf)
        setattr(host, leaf, WithGuidance(original, GuidanceEmbedding(width, features, scale), slot))

    @property
    def wrapped(self) -> nn.Module:
        """The model inside (what an artifact's source describes)."""
        return self.model

    @property
    def embedding(self) -> GuidanceEmbedding:
        return self.model.get_submodule(self.site).embedding

    def forward(self, *args: Any, guidance: torch.Tensor | None = None, **kwargs: Any) -> Any:
        self._slot.value = guidance
        try:
            return self.model(*args, **kwargs)
        finally:
            self._slot.value = None

    def describe(self) -> dict[str, Any]:
        """Return what an artifact records to rebuild this wrapper (`site` and the embedding's settings)."""
        return {"kind": "guidance_input", "site": self.site, **self.settings}
