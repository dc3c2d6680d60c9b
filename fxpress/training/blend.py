"""Interpolation between tuned encoders, for controllable styles (TextCraftor, PAPERS.md §4).

Two ways: in weight space (`blend_weights`: every floating-point tensor w·a + (1 − w)·b, for two encoders
tuned from the same original, or one tuned and the original), and in embedding space while sampling
(`blended_sample`: each step's condition w·e_tuned + (1 − w)·e_orig, optionally the tuned embeddings
for the last S steps only and the original's before).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from fxpress.errors import FxpressError
from fxpress.ir.sampler import SamplerSpec
from fxpress.training.reward_sampling import truncated_sample


def _check_weight(weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise FxpressError(f"blend weight must be a finite number, got {weight!r}")
    return float(weight)


def blend_weights(a: nn.Module, b: nn.Module, weight: float) -> nn.Module:
    """Return a copy of `a` whose floating-point tensors are weight·a + (1 − weight)·b (weight 1: `a`,
    0: `b`; outside [0, 1] extrapolates). Integer buffers (token positions) come from `a`. FxpressError
    names the first tensor the two models do not share with the same shape."""
    w = _check_weight(weight)
    state_a, state_b = a.state_dict(), b.state_dict()
    only = sorted(set(state_a) ^ set(state_b))
    if only:
        raise FxpressError(f"cannot blend models with different tensors: {only[:3]} are in one model only")
    for name, value in state_a.items():
        if value.shape != state_b[name].shape:
            raise FxpressError(f"cannot blend {name!r}: shapes {tuple(value.shape)} and "
                               f"{tuple(state_b[name].shape)} differ")
    blended = {name: torch.lerp(state_b[name].to(value.dtype), value, w) if value.is_floating_point() else value
               for name, value in state_a.items()}
    out = copy.deepcopy(a)
    out.load_state_dict(blended)
    return out


def blend_embeddings(tuned: torch.Tensor, original: torch.Tensor, weight: float) -> torch.Tensor:
    """Return weight·tuned + (1 − weight)·original (same shapes)."""
    if tuned.shape != original.shape:
        raise FxpressError(f"cannot blend embeddings of shapes {tuple(tuned.shape)} and {tuple(original.shape)}")
    return torch.lerp(original, tuned, _check_weight(weight))


@torch.no_grad()
def blended_sample(spec: SamplerSpec, model: Any, noise: torch.Tensor, tuned: tuple[torch.Tensor, torch.Tensor],
                   original: tuple[torch.Tensor, torch.Tensor], weight: float = 1.0,
                   last_steps: int | None = None) -> torch.Tensor:
    """Return samples whose steps are conditioned on w·tuned + (1 − w)·original embeddings ((cond, uncond)
    pairs); with `last_steps` S, only the last S steps use the blend and the earlier ones the original
    (the same split as `truncated_sample`'s, here without gradients)."""
    if last_steps is not None and (isinstance(last_steps, bool) or not isinstance(last_steps, int)
                                   or last_steps < 0):
        raise FxpressError(f"last_steps must be a non-negative integer or None, got {last_steps!r}")
    cond, uncond = original if last_steps == 0 else tuple(blend_embeddings(t, o, weight)
                                                          for t, o in zip(tuned, original))
    return truncated_sample(spec, model, noise, cond, uncond, grad_steps=last_steps or None,
                            frozen_cond=original[0], frozen_uncond=original[1], checkpoint=False)
