"""Sampling with gradients for reward fine-tuning: truncated backpropagation through the last K steps.

TextCraftor (like DRaFT) runs the first steps − K sampler steps without gradients, conditioned on the
frozen original encoder's embeddings, and the last K steps with gradients flowing through the denoiser
(frozen weights), the DDIM arithmetic and the tuned embeddings. Each step with gradients is
checkpointed, so memory grows with K by one step's input rather than one step's activations.
AlignProp draws K at random per update (`draw_grad_steps`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as checkpointed

from fxpress.errors import FxpressError
from fxpress.ir.sampler import SamplerSpec, ddim_step, guided_output


def check_grad_steps(grad_steps: int | None, steps: int) -> int:
    """Return how many of `steps` steps get gradients (None: all); FxpressError unless 1 <= K."""
    if grad_steps is None:
        return steps
    if isinstance(grad_steps, bool) or not isinstance(grad_steps, int) or grad_steps < 1:
        raise FxpressError(f"grad_steps must be a positive integer (or None for every step), got {grad_steps!r}")
    return min(grad_steps, steps)


def moving_steps(spec: SamplerSpec, grad_steps: int | None) -> int:
    """Return how many of the last `grad_steps` steps depend on the denoiser's output. A DDIM step whose
    previous alpha equals its own (diffusers' last step from t = 0 with set_alpha_to_one=False) returns its
    input unchanged wherever x0 is not clipped, so gradients do not reach the model through it."""
    k = check_grad_steps(grad_steps, spec.steps)
    pairs = list(zip(spec.timesteps, spec.prev_timesteps))[spec.steps - k:]
    return sum(1 for t, prev in pairs if spec.alpha(t) != spec.alpha(prev))


def draw_grad_steps(generator: torch.Generator, most: int) -> int:
    """Return a K drawn uniformly from 1..`most` (AlignProp's random truncation)."""
    return int(torch.randint(1, most + 1, (1,), generator=generator))


def truncated_sample(spec: SamplerSpec, model: Any, noise: torch.Tensor, cond: torch.Tensor,
                     uncond: torch.Tensor | None = None, *, grad_steps: int | None = None,
                     frozen_cond: torch.Tensor | None = None, frozen_uncond: torch.Tensor | None = None,
                     checkpoint: bool = True) -> torch.Tensor:
    """Return samples from `noise` with the spec's sampler, differentiable through its last `grad_steps`
    steps (None: all). The earlier steps run without gradients on `frozen_cond` / `frozen_uncond` (the
    original encoder's embeddings; default: `cond` / `uncond` detached). With `checkpoint`, each step with
    gradients recomputes its activations in the backward pass."""
    k = check_grad_steps(grad_steps, spec.steps)
    first = spec.steps - k
    early_cond = (frozen_cond if frozen_cond is not None else cond).detach()
    early_uncond = frozen_uncond if frozen_uncond is not None else uncond
    early_uncond = early_uncond.detach() if early_uncond is not None else None
    pairs = list(zip(spec.timesteps, spec.prev_timesteps))
    x = noise
    with torch.no_grad():
        for t, prev in pairs[:first]:
            x = _step(spec, model, x, t, prev, early_cond, early_uncond)
    x = x.detach()
    for t, prev in pairs[first:]:
        if checkpoint and torch.is_grad_enabled():
            x = checkpointed(_step, spec, model, x, t, prev, cond, uncond, use_reentrant=False)
        else:
            x = _step(spec, model, x, t, prev, cond, uncond)
    return x


def _step(spec: SamplerSpec, model: Any, x: torch.Tensor, t: int, prev: int, cond: torch.Tensor,
          uncond: torch.Tensor | None) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    out = guided_output(spec, model, x, tt, cond, uncond)
    return ddim_step(spec, x, out, spec.alpha(t), spec.alpha(prev))
