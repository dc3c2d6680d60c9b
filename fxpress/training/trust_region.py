"""A trust region on the conditioning: keep a tuned text encoder's embeddings near the original encoder's.

Reward gradients through a sampler are noisy, and Adam moves every weight by about the learning rate per
update whatever the signal, so the encoder random-walks. Most walks stay harmless; some break the samples
(on the shapes testbed one seed in three; `benchmarks/results/textcraftor.md`). The penalty pulls back only
past a distance the user allows, so inside it the reward's pull is not held back.
"""

from __future__ import annotations

import torch

from fxpress.errors import FxpressError
from fxpress.training.distributed import global_mean


def relative_drift(tuned: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """The mean over rows (the first dimension) of ‖tuned − original‖² / ‖original‖²: a squared relative
    distance, 0.01 for embeddings 10% away from the original."""
    if tuned.shape != original.shape:
        raise FxpressError(f"conditioning drift: tuned embeddings {tuple(tuned.shape)} and original "
                           f"{tuple(original.shape)} differ in shape")
    diff = (tuned - original).flatten(1).pow(2).sum(1)
    scale = original.flatten(1).pow(2).sum(1).clamp_min(torch.finfo(original.dtype).tiny)
    return (diff / scale).mean()


def drift_penalty(drift: torch.Tensor, limit: float, weight: float) -> torch.Tensor:
    """weight·(drift − limit²) while the whole batch's drift (under torchrun the mean over every process)
    exceeds limit², else zero; `limit` is a relative distance (0.1: 10%), `drift` a `relative_drift`."""
    if global_mean(drift.detach()) <= limit ** 2:
        return drift * 0.0
    return weight * (drift - limit ** 2)
