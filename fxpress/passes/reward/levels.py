"""The level a model reaches on each reward: what a reward kept as a constraint must not fall below.

`reward_levels` samples the prompts in turn (prompt i % len for image i, so every prompt counts alike, as
the training draw does on average) from seeded noise with the whole sampler and no gradients, and returns
each reward's mean. `fxpress.tune` measures the original model this way before training and gives the
rewards it keeps those floors (`WeightedRewards.with_floors`).
"""

from __future__ import annotations

import torch
from torch import nn

from fxpress.errors import RecipeError
from fxpress.ir.sampler import SamplerSpec
from fxpress.training.prompt_set import PromptSet, encode_ids
from fxpress.training.reward_sampling import truncated_sample
from fxpress.training.rewards import WeightedRewards


@torch.no_grad()
def reward_levels(rewards: WeightedRewards, sampler: SamplerSpec, text_encoder: nn.Module, denoiser: nn.Module,
                  prompts: PromptSet, shape: tuple[int, ...], samples: int = 256, seed: int = 0,
                  batch: int = 64) -> dict[str, float]:
    """Return each reward's mean over `samples` images of `prompts` (in turn) drawn by `text_encoder` and
    `denoiser` through `sampler` from noise seeded by `seed`, as training scores them (not clamped)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise RecipeError(f"reward levels: samples must be a positive integer, got {samples!r}")
    device = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
    index = torch.arange(samples) % len(prompts)
    noise = torch.randn((samples, *shape), generator=torch.Generator().manual_seed(seed))
    uncond = encode_ids(text_encoder, prompts.unconditional.to(device))
    totals: dict[str, float] = {}
    for lo in range(0, samples, batch):
        rows = index[lo:lo + batch]
        cond = encode_ids(text_encoder, prompts.input_ids[rows].to(device))
        images = truncated_sample(sampler, denoiser, noise[lo:lo + batch].to(device), cond, uncond, grad_steps=None)
        targets = {name: value[rows].to(device) for name, value in prompts.targets.items()}
        for name, value in rewards.scores(images, targets).items():
            totals[name] = totals.get(name, 0.0) + float(value.double().sum())
    return {name: total / samples for name, total in totals.items()}


__all__ = ["reward_levels"]
