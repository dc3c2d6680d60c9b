"""The objectives every training pass builds its loss from: noised batches, guided predictions, the KD loss.

QAT, pruning (its KD scores and KD recovery) and step distillation all distil a student from a teacher
on noised training samples; they share these three pieces so that a change to one (how timesteps are
drawn, how features are weighted) reaches every pass alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxpress.errors import TrainingError
from fxpress.training.diffusion_data import DiffusionData

KD_NORMALIZE = ("none", "features", "all")


def draw_timesteps(gen: torch.Generator, size: int, total: int, mode: str = "uniform",
                   beta: tuple[float, float] = (3.0, 1.0)) -> torch.Tensor:
    """Return `size` integer timesteps in [0, total): uniform, or Beta(a, b) scaled to the range.

    Beta(3, 1) (BitsFusion) favours large t, where quantization error is largest. Draws are
    deterministic in `gen`.
    """
    if mode == "uniform":
        return torch.randint(0, total, (size,), generator=gen)
    if mode != "beta":
        raise TrainingError(f"timestep draw must be 'uniform' or 'beta', got {mode!r}")
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    fraction = torch.from_numpy(rng.beta(beta[0], beta[1], size))
    return (fraction * total).long().clamp_(0, total - 1)


@dataclass
class NoisedBatch:
    """One global training batch: clean samples, their noise, timesteps, conditions (some dropped to the
    unconditional one), the noisy samples, a guidance weight per row, and the data's further inputs."""

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    noisy: torch.Tensor
    guidance: torch.Tensor
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def shard(self, ctx) -> NoisedBatch:
        """Return this rank's slice of every field (`Distributed.shard`)."""
        return NoisedBatch(*(ctx.shard(v) for v in (self.x0, self.noise, self.t, self.cond, self.noisy,
                                                     self.guidance)),
                           {k: ctx.shard(v) for k, v in self.inputs.items()})


def noised_batch(data: DiffusionData, gen: torch.Generator, size: int, *, timesteps: str = "uniform",
                 beta: tuple[float, float] = (3.0, 1.0), prompt_dropout: float = 0.0,
                 guidance: tuple[float, float] = (1.0, 1.0), timesteps_first: bool = False,
                 input_dropout: float = 0.0) -> NoisedBatch:
    """Draw a batch of `size` rows with `gen`: samples and conditions, noise, timesteps (see
    `draw_timesteps`), conditions replaced by the unconditional one with probability `prompt_dropout`,
    and guidance weights uniform in `guidance`. The draws happen in that order (timesteps before noise
    with `timesteps_first`, the order KD recovery has always used), always all of them, so a batch
    depends only on the generator's seed and these settings.

    The data's further inputs come with their rows; those with a null value are dropped where the
    prompt is, and on their own with probability `input_dropout` (drawn last, only when the data has
    droppable inputs, so batches of data without them are unchanged)."""
    x0, cond, inputs = data.batch_with_inputs(gen, size)
    if timesteps_first:
        t = draw_timesteps(gen, size, data.num_timesteps, timesteps, beta)
        noise = torch.randn(x0.shape, generator=gen)
    else:
        noise = torch.randn(x0.shape, generator=gen)
        t = draw_timesteps(gen, size, data.num_timesteps, timesteps, beta)
    drop = torch.rand(size, generator=gen) < prompt_dropout
    cond = torch.where(drop.view(-1, *[1] * (cond.dim() - 1)), data.unconditional.expand_as(cond), cond)
    w = guidance[0] + (guidance[1] - guidance[0]) * torch.rand(size, generator=gen)
    if data.null_inputs:
        inputs = data.drop_inputs(inputs, drop | (torch.rand(size, generator=gen) < input_dropout))
    return NoisedBatch(x0, noise, t, cond, data.add_noise(x0, noise, t), w, inputs)


def broadcast_rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return per-row `values` (B,) shaped to broadcast against `like` (B, ...)."""
    return values.view(-1, *[1] * (like.dim() - 1))


def guided_prediction(data: DiffusionData, model: nn.Module, noisy: torch.Tensor, t: torch.Tensor,
                      cond: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """Return the classifier-free-guided prediction u + w (c - u) of `model`, the unconditional and
    conditional branches run as one batch; `guidance` holds one weight per row."""
    uncond = data.unconditional.to(cond.device).expand_as(cond)
    both = data.predict(model, torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([uncond, cond]))
    u, c = both.chunk(2)
    return u + broadcast_rows(guidance.to(u.dtype), u) * (c - u)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, student_features: dict[str, torch.Tensor] | None = None,
            teacher_features: dict[str, torch.Tensor] | None = None, *, feature_weight: float = 0.0,
            normalize: str = "features") -> torch.Tensor:
    """Return the knowledge-distillation loss: output MSE plus `feature_weight` times the mean block-feature
    MSE over the features both sides recorded with the same shape.

    `normalize` divides by the teacher's variance: "none" (plain MSEs), "features" (each feature MSE, so
    blocks of different scales weigh alike) or "all" (the output MSE too, so losses of different models
    compare). Raises TrainingError when the outputs' shapes differ.
    """
    if normalize not in KD_NORMALIZE:
        raise TrainingError(f"kd_loss: normalize must be one of {KD_NORMALIZE}, got {normalize!r}")
    if student.shape != teacher.shape:
        raise TrainingError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} "
                            "differ in shape: the two models do not predict the same thing")
    loss = F.mse_loss(student, teacher)
    if normalize == "all":
        loss = loss / teacher.var().clamp_min(1e-12)
    if not feature_weight or not student_features or not teacher_features:
        return loss
    shared = [k for k, v in teacher_features.items()
              if k in student_features and student_features[k].shape == v.shape]
    if not shared:  # a model without UNet/DiT blocks, or a pruned one whose blocks all changed shape
        return loss
    eps = 1e-12 if normalize == "all" else 1e-8
    terms = [F.mse_loss(student_features[k], teacher_features[k]) for k in shared]
    if normalize != "none":
        terms = [m / teacher_features[k].var().clamp_min(eps) for m, k in zip(terms, shared)]
    return loss + feature_weight * torch.stack(terms).mean()
