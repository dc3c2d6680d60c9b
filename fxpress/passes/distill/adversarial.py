"""`AdversarialDistill`: a few-step generator trained against a discriminator built from the frozen teacher.

LADD-style. The generator is the model (initialised from the teacher or from a progressive student) on a
`steps`-step grid. Each training step takes teacher samples s (many-step, with their noise z and
prompt), puts them on the generator's grid at a random step, x = alpha s + sigma z, and has the
generator predict the clean image. Its loss is `regression_weight` times the MSE to s plus
`adversarial_weight` times the hinge generator loss -D(fake) of the discriminator on the prediction
re-noised to a random timestep. The discriminator (teacher-block features or a fresh small
network, with light heads; see `discriminator.py`) is trained in the same optimizer step on real
training images and teacher samples against the detached predictions, with the hinge loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxpress.errors import PassError
from fxpress.ir.graph import Graph
from fxpress.ir.sampler import SamplerSpec, guided_output, predicted_x0
from fxpress.kernels.guidance import GuidanceConditioned
from fxpress.passes.base import PassResult
from fxpress.passes.context import PassContext
from fxpress.passes.distill.config import DistillConfig
from fxpress.passes.distill.discriminator import Discriminator
from fxpress.passes.distill.sampler_specs import base_spec, check_same_outputs, grid_spec, guidance_mode
from fxpress.passes.distill.teacher_samples import teacher_samples
from fxpress.passes.training_pass import TrainingPass
from fxpress.training.loop import step_generator
from fxpress.training.objectives import broadcast_rows


class AdversarialDistill(TrainingPass):
    """Train the model as a `steps`-step generator: regression to the teacher's samples plus an adversarial
    loss from a discriminator on frozen teacher features (or a fresh network: `discriminator="fresh"`)."""

    provides = ("distilled",)

    def __init__(self, config: DistillConfig):
        self.config = config.validate()

    def _specs(self, graph: Graph, base: SamplerSpec, teacher) -> tuple[SamplerSpec, SamplerSpec]:
        cfg = self.config
        recorded_teacher = getattr(teacher, "fxpress_sampler", None)
        if recorded_teacher:  # a distilled teacher (by default the model itself) samples only as it was trained
            teacher_spec = SamplerSpec.from_json(recorded_teacher)
        else:
            teacher_spec = grid_spec(base, cfg.teacher_steps, guidance=guidance_mode(teacher),
                                     guidance_scale=cfg.guidance_scale)
        student_mode = "embedded" if isinstance(graph.module, GuidanceConditioned) else "none"
        prediction = teacher_spec.prediction if cfg.prediction == "teacher" else cfg.prediction
        recorded = graph.extras.get("sampler")
        if recorded:  # a progressive student: keep its grid and parameterisation
            own = SamplerSpec.from_json(recorded)
            if own.notes.get("method") in ("progressive", "adversarial") and own.steps != cfg.steps:
                raise PassError(f"the model was distilled to {own.steps} steps; adversarial distillation from it "
                                f"must keep steps = {own.steps}", self.name)
            prediction, student_mode = own.prediction, own.guidance
        student_spec = grid_spec(base, cfg.steps, guidance=student_mode, prediction=prediction,
                                 guidance_scale=cfg.guidance_scale,
                                 notes={"method": "adversarial", "discriminator": cfg.discriminator})
        return teacher_spec, student_spec

    def train(self, graph: Graph, context: PassContext) -> PassResult:
        cfg = self.config
        data = context.require_data(self.name, "adversarial distillation")
        teacher = context.require_teacher(self.name)
        check_same_outputs(graph.module, teacher, data, self.name)
        base = base_spec(data, self.name)
        teacher_spec, spec = self._specs(graph, base, teacher)
        pool = teacher_samples(teacher_spec, teacher, data, cfg.regression_pool, seed=cfg.seed + 7)
        student = graph.module
        uncond = data.unconditional
        grid = torch.tensor(spec.timesteps)
        alphas = torch.tensor(spec.alphas_cumprod)
        total = data.num_timesteps

        def teacher_forward(x, t, cond):
            return data.predict(teacher, x, t, cond)

        gen0 = torch.Generator().manual_seed(cfg.seed)
        x_ex, cond_ex = data.batch(gen0, 2)
        disc = Discriminator(teacher, teacher_forward, (x_ex, torch.full((2,), total // 2), cond_ex),
                             cond_ex.shape[-1], cfg.discriminator)

        def make_loss(model, ctx):
            def loss_fn(step: int) -> torch.Tensor:
                gen = step_generator(cfg.seed + 1, step)
                z, cond, target = pool.batch(gen, cfg.batch)
                real, real_cond = data.batch(gen, cfg.batch)
                mix = torch.rand(cfg.batch, generator=gen) < 0.5  # real images and teacher samples, half each
                real = torch.where(broadcast_rows(mix, real), real, target)
                real_cond = torch.where(broadcast_rows(mix, real_cond), real_cond, cond)
                t = grid[torch.randint(0, len(grid), (cfg.batch,), generator=gen)]
                t_d = torch.randint(0, total, (cfg.batch,), generator=gen)
                noise_d = torch.randn(target.shape, generator=gen)
                w = torch.full((cfg.batch,), spec.guidance_scale)
                z, cond, target, real, real_cond, t, t_d, noise_d, w = (
                    ctx.shard(v) for v in (z, cond, target, real, real_cond, t, t_d, noise_d, w))
                a = broadcast_rows(alphas.to(z.device)[t], z)
                x = a.sqrt() * target + (1 - a).sqrt() * z
                x0 = predicted_x0(spec, x, guided_output(spec, model, x, t, cond, uncond.to(z.device), w), a)
                loss = cfg.regression_weight * F.mse_loss(x0, target)
                if cfg.adversarial_weight:
                    fake = data.add_noise(x0.clamp(-1, 1), noise_d, t_d)
                    loss = loss - cfg.adversarial_weight * disc.logits(fake, t_d, cond, frozen=True).mean()
                    both = torch.cat([data.add_noise(real, noise_d, t_d), fake.detach()])
                    logits = disc.logits(both, torch.cat([t_d, t_d]), torch.cat([real_cond, cond]))
                    d_real, d_fake = logits.chunk(2)
                    loss = loss + F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
                return loss
            return loss_fn

        groups = [{"params": list(student.parameters()), "lr": cfg.lr},
                  {"params": list(disc.parameters()), "lr": cfg.discriminator_lr}]
        try:
            report = self.fit(context, student, make_loss, cfg.train_steps, groups, frozen=[teacher],
                              warmup=cfg.warmup, extra_modules={"discriminator": disc},
                              description=f"adversarial distillation to {cfg.steps} steps")
        finally:
            disc.close()
        graph.extras["sampler"] = spec.to_json()
        return PassResult(graph, True, {**report, "sampler_steps": spec.steps, "calls_per_step": spec.calls_per_step,
                                        "discriminator": cfg.discriminator, "teacher_samples": cfg.regression_pool,
                                        "teacher_steps": teacher_spec.steps, "prediction": spec.prediction})
