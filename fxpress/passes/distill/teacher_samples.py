"""Teacher samples for distillation: (noise, condition, the teacher's many-step sample) triples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxpress.ir.sampler import SamplerSpec, sample
from fxpress.passes.progress import progress_bar
from fxpress.training.diffusion_data import DiffusionData


@dataclass
class TeacherSamples:
    """`noise` (N, ...), `cond` (N, ...) and `images` (N, ...): the teacher's sample from each noise."""

    noise: torch.Tensor
    cond: torch.Tensor
    images: torch.Tensor

    def batch(self, gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return `size` triples drawn with replacement using `gen`."""
        index = torch.randint(0, self.images.shape[0], (size,), generator=gen)
        return self.noise[index], self.cond[index], self.images[index]


@torch.no_grad()
def teacher_samples(spec: SamplerSpec, teacher, data: DiffusionData, count: int, seed: int = 0,
                    batch: int = 128) -> TeacherSamples:
    """Return `count` samples of `teacher` under `spec`, for conditions drawn from the training data (the
    unconditional one never: guidance needs a prompt) and seeded noise; clipped to [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    _, cond = data.batch(gen, count)
    noise = torch.randn((count, *data.samples.shape[1:]), generator=gen)
    images = []
    with progress_bar(f"teacher samples ({spec.steps} steps)", count) as advance:
        for lo in range(0, count, batch):
            hi = min(count, lo + batch)
            images.append(sample(spec, teacher, noise[lo:hi], cond[lo:hi], data.unconditional).clamp(-1, 1))
            advance(hi - lo)
    return TeacherSamples(noise, cond, torch.cat(images))
