"""The samplers a distillation pass trains for: the teacher's and the student's, on nested trailing grids."""

from __future__ import annotations

import torch
from torch import nn

from fxpress.errors import PassError
from fxpress.ir.sampler import SamplerSpec, trailing_timesteps
from fxpress.kernels.guidance import GuidanceConditioned
from fxpress.training.diffusion_data import DiffusionData


def base_spec(data: DiffusionData, pass_name: str) -> SamplerSpec:
    """Return diffusers' DDIM under the training data's scheduler (input names from the data), one step;
    raises PassError when the scheduler has no noise schedule to sample with."""
    scheduler = data.scheduler
    config = getattr(scheduler, "config", None)
    if config is None or not hasattr(scheduler, "alphas_cumprod") or "num_train_timesteps" not in config:
        raise PassError(f"the training data's scheduler ({type(scheduler).__name__}) has no noise schedule "
                        "(config.num_train_timesteps, alphas_cumprod): give DiffusionData a diffusers scheduler",
                        pass_name)
    return SamplerSpec.from_scheduler(scheduler, 1, sample_input=data.sample_input,
                                      timestep_input=data.timestep_input, condition_input=data.condition_input)


def guidance_mode(model: nn.Module) -> str:
    """Return how guidance reaches `model`: 'embedded' for a guidance-conditioned model, else 'cfg'."""
    return "embedded" if isinstance(model, GuidanceConditioned) else "cfg"


def grid_spec(base: SamplerSpec, steps: int, **changes) -> SamplerSpec:
    """Return `base` on the trailing grid of `steps` steps (grids of 2^k steps nest)."""
    return base.with_timesteps(trailing_timesteps(len(base.alphas_cumprod), steps), **changes)


def check_same_outputs(student: nn.Module, teacher: nn.Module, data: DiffusionData, pass_name: str) -> None:
    """Raise PassError when student and teacher give outputs of different shapes on a training batch."""
    gen = torch.Generator().manual_seed(0)
    x0, cond = data.batch(gen, 2)
    t = torch.full((2,), data.num_timesteps // 2, dtype=torch.long)
    device = next(iter(student.parameters())).device
    with torch.no_grad():
        a = data.predict(student, x0.to(device), t.to(device), cond.to(device))
        b = data.predict(teacher, x0.to(device), t.to(device), cond.to(device))
    if a.shape != b.shape:
        raise PassError(f"the student predicts {tuple(a.shape)} where the teacher predicts {tuple(b.shape)}: "
                        "they must be two versions of one denoiser", pass_name)
