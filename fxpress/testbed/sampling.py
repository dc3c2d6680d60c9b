"""The diffusion schedule of the testbeds and classifier-free-guided DDIM sampling (diffusers schedulers)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from fxpress.ir.graph import output_tensors
from fxpress.ir.sampler import SamplerSpec, sample

SCHEDULE: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                            "prediction_type": "epsilon"}
PREDICTIONS = ("epsilon", "v_prediction")


def schedule(prediction: str = "epsilon") -> dict[str, Any]:
    """Return the testbeds' schedule for a model predicting the noise ('epsilon') or the velocity."""
    return {**SCHEDULE, "prediction_type": prediction}


def training_scheduler(prediction: str = "epsilon") -> DDPMScheduler:
    """Return the noise schedule the testbed models are trained with."""
    return DDPMScheduler(**schedule(prediction), clip_sample=True)


def predict_noise(model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor,
                  sample_input: str = "sample", inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Return the prediction (noise or velocity) of a denoiser taking the noisy sample as keyword
    `sample_input` ("sample" for UNets, "hidden_states" for DiTs) and any further keyword `inputs`; its
    output may be a diffusers output, tuple or tensor."""
    return output_tensors(model(**{sample_input: sample}, timestep=timestep, encoder_hidden_states=hidden,
                                **(inputs or {})))[0]


def guided_noise(model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                 uncond: torch.Tensor, guidance: float, sample_input: str = "sample",
                 inputs: dict[str, torch.Tensor] | None = None,
                 null_inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Return eps(x, ∅) + guidance · (eps(x, c) − eps(x, ∅)), both branches in one batch.

    Further `inputs` (B, ...) go with the conditional rows; the unconditional rows get their value from
    `null_inputs` (1, ...) where given (an image adapter's "no image"), else the same value (a control map).
    """
    nulls = null_inputs or {}
    both_inputs = {name: torch.cat([nulls[name].to(value).expand_as(value) if name in nulls else value, value])
                   for name, value in (inputs or {}).items()}
    both = predict_noise(model, torch.cat([sample, sample]), torch.cat([timestep, timestep]),
                         torch.cat([uncond.expand_as(cond), cond]), sample_input, both_inputs)
    eps_u, eps_c = both.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def sample_images(model: nn.Module, cond: torch.Tensor, uncond: torch.Tensor, shape: tuple[int, int, int], *,
                  steps: int = 25, guidance: float = 3.0, seed: int = 0, batch: int = 250,
                  sample_input: str = "sample", prediction: str = "epsilon",
                  inputs: dict[str, torch.Tensor] | None = None,
                  null_inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Return len(cond) images (N, C, H, W) in [-1, 1] drawn with DDIM (eta 0) and CFG.

    Image i starts from the noise of generator seed+i, so two models given the same seed and
    prompts start from the same noise (paired comparison). `inputs` are further per-image keyword
    inputs (N, ...) and `null_inputs` their unconditional values (see `guided_noise`).
    """
    scheduler = DDIMScheduler(**schedule(prediction), clip_sample=True, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
                         for i in range(cond.shape[0])])
    out = []
    for lo in range(0, cond.shape[0], batch):
        x = noise[lo:lo + batch].clone()
        c = cond[lo:lo + batch]
        extra = {name: value[lo:lo + batch] for name, value in (inputs or {}).items()}
        for t in scheduler.timesteps:
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
            eps = guided_noise(model, x, tt, c, uncond, guidance, sample_input, extra, null_inputs)
            x = scheduler.step(eps, t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def seeded_noise(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Return `count` noise tensors, the i-th drawn from generator seed + i (paired across models)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(count)])


@torch.no_grad()
def sample_with(spec: SamplerSpec, model: nn.Module, cond: torch.Tensor, uncond: torch.Tensor,
                shape: tuple[int, int, int], *, seed: int = 0, batch: int = 250) -> torch.Tensor:
    """Return len(cond) images in [-1, 1] drawn with the sampler `spec` describes (a distilled student's own
    timesteps, prediction and guidance), from the same seeded noise as `sample_images`."""
    noise = seeded_noise(cond.shape[0], shape, seed)
    out = [sample(spec, model, noise[lo:lo + batch], cond[lo:lo + batch], uncond)
           for lo in range(0, cond.shape[0], batch)]
    return torch.cat(out).clamp(-1, 1)
