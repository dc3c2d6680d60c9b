"""`DiffusionData`: what noise-prediction training needs: clean samples, their conditions, a noise schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
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

    `inputs` are further per-sample keyword inputs (N, ...) drawn with the same rows, e.g. an image
    adapter's reference features or a control branch's map. An input named in `null_inputs` has a
    "nothing given" value (1, ...) that replaces it where a row is dropped; the others are always given.
    """

    samples: torch.Tensor
    conditions: torch.Tensor
    unconditional: torch.Tensor
    scheduler: Any
    sample_input: str = "sample"
    timestep_input: str = "timestep"
    condition_input: str = "encoder_hidden_states"
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    null_inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.samples.shape[0] != self.conditions.shape[0] or self.samples.shape[0] == 0:
            raise ValueError(f"need as many conditions as samples (got {self.samples.shape[0]} samples, "
                             f"{self.conditions.shape[0]} conditions)")
        for name, value in self.inputs.items():
            if value.shape[0] != self.samples.shape[0]:
                raise ValueError(f"input {name!r} has {value.shape[0]} rows for {self.samples.shape[0]} samples")
        unknown = set(self.null_inputs) - set(self.inputs)
        if unknown:
            raise ValueError(f"null_inputs names inputs the data does not have: {sorted(unknown)}")

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def batch(self, gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `size` (x0, condition) pairs drawn with replacement using `gen`."""
        x0, cond, _ = self.batch_with_inputs(gen, size)
        return x0, cond

    def batch_with_inputs(self, gen: torch.Generator, size: int
                          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Return `size` rows drawn with replacement using `gen`: x0, conditions and the further inputs
        (the same draw as `batch`)."""
        index = torch.randint(0, self.samples.shape[0], (size,), generator=gen)
        return self.samples[index], self.conditions[index], {k: v[index] for k, v in self.inputs.items()}

    def drop_inputs(self, inputs: dict[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return `inputs` with the rows where `drop` (B,) is true set to their null value (those that have one)."""
        out = dict(inputs)
        for name, null in self.null_inputs.items():
            value = inputs[name]
            out[name] = torch.where(drop.view(-1, *[1] * (value.dim() - 1)), null.to(value).expand_as(value), value)
        return out

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Return x_t for the scheduler's forward process."""
        return self.scheduler.add_noise(x0, noise, timesteps)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Return what the model is trained to predict (see `training_target`)."""
        return training_target(self.scheduler, x0, noise, timesteps)

    def predict(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditions: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Return the model's prediction (its first output tensor: noise or velocity); `inputs` are passed
        as further keywords."""
        out = model(**{self.sample_input: noisy, self.timestep_input: timesteps, self.condition_input: conditions},
                    **(inputs or {}))
        return output_tensors(out)[0]
