"""Training, calibration and example inputs for a testbed denoiser, from real data and its captions."""

from __future__ import annotations

import torch

from fxpress.testbed.models import Testbed
from fxpress.testbed.sampling import training_scheduler
from fxpress.training.diffusion_data import DiffusionData


def diffusion_data(testbed: Testbed, split: str = "train") -> DiffusionData:
    """Return the testbed's images with their caption embeddings (text encoder frozen) as DiffusionData."""
    images = testbed.spec.load_split(split)
    return DiffusionData(images.images, testbed.encode(images.captions), testbed.encode([""]),
                         training_scheduler(testbed.spec.prediction),
                         sample_input=testbed.spec.sample_input)


def noisy_inputs(testbed: Testbed, timesteps: list[int], seed: int, batch: int = 2) -> list[dict[str, torch.Tensor]]:
    """Return denoiser kwargs built from real training images noised to each of `timesteps` (seeded)."""
    data = diffusion_data(testbed)
    out = []
    for i, t in enumerate(timesteps):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        x0, cond = data.batch(gen, batch)
        tt = torch.full((batch,), int(t), dtype=torch.long)
        out.append({data.sample_input: data.add_noise(x0, torch.randn(x0.shape, generator=gen), tt), "timestep": tt,
                    "encoder_hidden_states": cond})
    return out
