"""KD recovery: fine-tune a pruned student to match its unpruned teacher (output and block features)."""

from __future__ import annotations

from torch import nn

from fxpress.passes.distill.features import FeatureTap, block_modules
from fxpress.passes.training_pass import train_student
from fxpress.training.diffusion_data import DiffusionData
from fxpress.training.loop import step_generator
from fxpress.training.objectives import kd_loss, noised_batch


def recover(student: nn.Module, teacher: nn.Module, data: DiffusionData, steps: int, *, batch: int = 32,
            lr: float = 1e-4, feature_weight: float = 1.0, seed: int = 0) -> list[float]:
    """Train `student` in place for `steps` steps on noised training samples at uniform timesteps (drawn
    before the noise, so recovery runs reproduce the batches of earlier releases),
    matching the frozen `teacher`'s noise prediction and block outputs (`kd_loss`, each feature MSE
    divided by the teacher's variance); return the losses."""
    if steps <= 0:
        return []
    taps_s, taps_t = FeatureTap(block_modules(student)), FeatureTap(block_modules(teacher))

    def make_loss(model, ctx):
        def loss_fn(step: int):
            b = noised_batch(data, step_generator(seed, step), batch, timesteps_first=True).shard(ctx)
            target = data.predict(teacher, b.noisy, b.t, b.cond).detach()
            out = data.predict(model, b.noisy, b.t, b.cond)
            return kd_loss(out, target, taps_s.values, taps_t.values, feature_weight=feature_weight,
                           normalize="features")
        return loss_fn

    try:
        report = train_student(student, make_loss, steps, [{"params": list(student.parameters()), "lr": lr}],
                               frozen=[teacher], description="KD recovery")
    finally:
        taps_s.close()
        taps_t.close()
    return report["losses"]
