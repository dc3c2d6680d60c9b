"""`DiffusionData`: what noise-prediction training needs: clean samples, their conditions, a noise schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxpress.ir.graph import output_tensors


def training_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Return what a model under `scheduler` is trained to predict: the noise, or the velocity when its
    `prediction_type` is 'v_prediction'."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; fxpress trains 'epsilon' and 'v_prediction'")


@dataclass
class DiffusionData:
    """Clean samples x0 (N, ...) with one condition each (N, ...), the unconditional condition (1, ...),
    and a diffusers-style scheduler (`add_noise`, `config.num_train_timesteps`).

    The model is called with keyword arguments named by `sample_input`, `timestep_input` and
    `condition_input` (a UNet2DConditionModel's defaults; a class-conditioned DiT would use
    condition_input='class_labels' and the null class as `unconditional`).
    """

    samples: torch.Tensor
    conditions: torch.Tensor
    unconditional: torch.Tensor
    scheduler: Any
    sample_input: str = "sample"
    timestep_input: str = "timestep"
    condition_input: str = "encoder_hidden_states"

    def __post_init__(self) -> None:
        if self.samples.shape[0] != self.conditions.shape[0] or self.samples.shape[0] == 0:
            raise ValueError(f"need as many conditions as samples (got {self.samples.shape[0]} samples, "
                             f"{self.conditions.shape[0]} conditions)")

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def batch(self, gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `size` (x0, condition) pairs drawn with replacement using `gen`."""
        index = torch.randint(0, self.samples.shape[0], (size,), generator=gen)
        return self.samples[index], self.conditions[index]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Return x_t for the scheduler's forward process."""
        return self.scheduler.add_noise(x0, noise, timesteps)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Return what the model is trained to predict (see `training_target`)."""
        return training_target(self.scheduler, x0, noise, timesteps)

    def predict(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditions: torch.Tensor) -> torch.Tensor:
        """Return the model's prediction (its first output tensor: noise or velocity)."""
        out = model(**{self.sample_input: noisy, self.timestep_input: timesteps, self.condition_input: conditions})
        return output_tensors(out)[0]
