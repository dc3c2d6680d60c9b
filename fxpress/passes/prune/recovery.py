"""KD recovery: fine-tune a pruned student to match its unpruned teacher (output and block features)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxpress.passes.distill.features import FeatureTap, block_modules
from fxpress.training.diffusion_data import DiffusionData
from fxpress.training.distributed import Distributed, unwrap
from fxpress.training.loop import step_generator, train_loop


def recover(student: nn.Module, teacher: nn.Module, data: DiffusionData, steps: int, *, batch: int = 32,
            lr: float = 1e-4, feature_weight: float = 1.0, seed: int = 0,
            ctx: Distributed | None = None) -> list[float]:
    """Train `student` in place for `steps` steps on noised training samples at uniform timesteps,
    matching the frozen `teacher`'s noise prediction and block outputs; return the losses."""
    if steps <= 0:
        return []
    ctx = ctx or Distributed()
    teacher = teacher.eval().requires_grad_(False)
    student.train().requires_grad_(True)
    model = ctx.wrap(student)
    optimizer = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.0)
    taps_s, taps_t = FeatureTap(block_modules(student)), FeatureTap(block_modules(teacher))

    def loss_fn(step: int) -> torch.Tensor:
        gen = step_generator(seed, step)
        x0, cond = data.batch(gen, batch)
        t = torch.randint(0, data.num_timesteps, (batch,), generator=gen)
        noisy = data.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        x, t, cond = ctx.shard(noisy), ctx.shard(t), ctx.shard(cond)
        with torch.no_grad():
            target = data.predict(teacher, x, t, cond)
        loss = F.mse_loss(data.predict(model, x, t, cond), target)
        if feature_weight:
            shared = [k for k, v in taps_t.values.items()
                      if k in taps_s.values and taps_s.values[k].shape == v.shape]
            if shared:
                loss = loss + feature_weight * sum(
                    F.mse_loss(taps_s.values[k], taps_t.values[k]) / taps_t.values[k].var().clamp_min(1e-8)
                    for k in shared) / len(shared)
        return loss

    try:
        with torch.enable_grad():
            losses = train_loop(loss_fn, optimizer, steps, ctx, {"student": unwrap(model)},
                                description="KD recovery")
    finally:
        taps_s.close()
        taps_t.close()
    student.eval().requires_grad_(False)
    return losses

