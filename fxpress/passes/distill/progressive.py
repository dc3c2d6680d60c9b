"""`ProgressiveDistill`: rounds in which a student learns to take in one step what its teacher takes in two.

Salimans & Ho: from a point x_t on the student's grid, the teacher takes two DDIM steps (t -> the
midpoint its grid has -> the student's next timestep t'); the student is trained so that its single
DDIM step from t lands on the same point. That fixes the clean sample it must predict,
x0* = (x_t' - (sigma_t'/sigma_t) x_t) / (alpha_t' - (sigma_t'/sigma_t) alpha_t) (alpha, sigma: the
square roots of the cumulative alpha and of one minus it); the loss is max(SNR, 1) times the squared
error of the student's x0. Each round's student starts from the last one and becomes the next teacher.
"""

from __future__ import annotations

import copy

import torch

from fxpress.errors import PassError
from fxpress.ir.graph import Graph
from fxpress.ir.sampler import SamplerSpec, ddim_step, guided_output, predicted_x0
from fxpress.kernels.guidance import GuidanceConditioned
from fxpress.passes.base import PassResult
from fxpress.passes.context import PassContext
from fxpress.passes.distill.config import DistillConfig
from fxpress.passes.distill.sampler_specs import base_spec, check_same_outputs, grid_spec, guidance_mode
from fxpress.passes.training_pass import TrainingPass
from fxpress.training.loop import step_generator
from fxpress.training.objectives import broadcast_rows, noised_batch


def two_step_target(teacher_spec: SamplerSpec, teacher, x: torch.Tensor, t: torch.Tensor, mid: torch.Tensor,
                    prev: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Return the x0 a single DDIM step from (x, t) to `prev` must predict to land where the teacher's two
    steps t -> mid -> prev land (per row; timesteps (B,), -1 meaning the end)."""
    alphas = torch.tensor([*teacher_spec.alphas_cumprod, teacher_spec.final_alpha_cumprod], dtype=x.dtype,
                          device=x.device)

    def alpha(steps: torch.Tensor) -> torch.Tensor:
        return broadcast_rows(alphas[steps.clamp_min(-1)], x)  # index -1 is the final alpha

    a_t, a_mid, a_prev = alpha(t), alpha(mid), alpha(prev)
    x_mid = ddim_step(teacher_spec, x, guided_output(teacher_spec, teacher, x, t, cond, uncond, w), a_t, a_mid)
    x_prev = ddim_step(teacher_spec, x_mid, guided_output(teacher_spec, teacher, x_mid, mid, cond, uncond, w),
                       a_mid, a_prev)
    ratio = ((1 - a_prev) / (1 - a_t)).sqrt()
    return (x_prev - ratio * x) / (a_prev.sqrt() - ratio * a_t.sqrt())


class ProgressiveDistill(TrainingPass):
    """Halve the sampler's steps round by round, from `teacher_steps` to `steps` (see module docstring).

    The first teacher is the context's (the model before any pass, sampled with CFG; or the model itself
    when it was distilled already, on its own grid); the artifact records the student's sampler
    (`graph.extras['sampler']`).
    """

    provides = ("distilled",)

    def __init__(self, config: DistillConfig):
        self.config = config.validate()

    def train(self, graph: Graph, context: PassContext) -> PassResult:
        cfg = self.config
        data = context.require_data(self.name, "progressive distillation")
        base = base_spec(data, self.name)
        student = graph.module
        recorded = SamplerSpec.from_json(graph.extras["sampler"]) if graph.extras.get("sampler") else None
        if recorded is not None and recorded.notes.get("method") in ("progressive", "adversarial"):
            # a distilled model teaches from its own grid, parameterisation and guidance
            if recorded.steps != cfg.teacher_steps:
                raise PassError(f"the model was distilled to sample in {recorded.steps} steps, so it can only "
                                f"teach from there: set teacher_steps = {recorded.steps}", self.name)
            teacher = copy.deepcopy(student).eval().requires_grad_(False)
            teacher_spec = grid_spec(base, cfg.teacher_steps, guidance=recorded.guidance,
                                     prediction=recorded.prediction, guidance_scale=recorded.guidance_scale)
        else:  # the first teacher is the context's (the model before any pass: full precision, CFG)
            teacher = context.teacher if context.teacher is not None else copy.deepcopy(student)
            teacher.eval().requires_grad_(False)
            teacher_spec = grid_spec(base, cfg.teacher_steps, guidance=guidance_mode(teacher),
                                     guidance_scale=cfg.guidance[0])
        if not isinstance(student, GuidanceConditioned) and cfg.guidance[0] != cfg.guidance[1]:
            raise PassError(f"a student without a guidance input folds one guidance weight, but distill.guidance "
                            f"is the range {list(cfg.guidance)}: give one value, or run GuidanceDistill first",
                            self.name)
        check_same_outputs(student, teacher, data, self.name)
        prediction = teacher_spec.prediction if cfg.prediction == "teacher" else cfg.prediction
        student_mode = "embedded" if isinstance(student, GuidanceConditioned) else "none"
        rounds = []
        steps = cfg.teacher_steps
        while steps > cfg.steps:
            steps //= 2
            scale = cfg.guidance_scale if student_mode == "embedded" else cfg.guidance[0]
            student_spec = grid_spec(base, steps, guidance=student_mode, prediction=prediction, guidance_scale=scale)
            rounds.append({"grid": f"{steps * 2} -> {steps}",
                           **self._round(context, len(rounds), student, teacher, teacher_spec, student_spec, data)})
            teacher = copy.deepcopy(student).eval().requires_grad_(False)
            teacher_spec = student_spec
        spec = SamplerSpec.from_json({**student_spec.to_json(),
                                      "notes": {"method": "progressive", "teacher_steps": cfg.teacher_steps,
                                                "folded_guidance": student_mode == "none"}})
        graph.extras["sampler"] = spec.to_json()
        return PassResult(graph, True, {"rounds": rounds, "sampler_steps": spec.steps, "prediction": prediction,
                                        "calls_per_step": spec.calls_per_step,
                                        "train_steps": cfg.train_steps * len(rounds)})

    def _round(self, context: PassContext, index: int, student, teacher, teacher_spec: SamplerSpec,
               student_spec: SamplerSpec, data) -> dict:
        cfg = self.config
        starts = torch.tensor(student_spec.timesteps)
        mids = torch.tensor(teacher_spec.timesteps[1::2])
        prevs = torch.tensor(student_spec.prev_timesteps)
        alphas = torch.tensor([*student_spec.alphas_cumprod, student_spec.final_alpha_cumprod])
        uncond = data.unconditional

        def make_loss(model, ctx):
            def loss_fn(step: int) -> torch.Tensor:
                gen = step_generator(cfg.seed * 100 + index, step)
                b = noised_batch(data, gen, cfg.batch, prompt_dropout=cfg.prompt_dropout, guidance=cfg.guidance)
                pick = torch.randint(0, len(starts), (cfg.batch,), generator=gen)
                t, mid, prev = starts[pick], mids[pick], prevs[pick]
                x = data.add_noise(b.x0, b.noise, t)
                x, t, mid, prev, cond, w = (ctx.shard(v) for v in (x, t, mid, prev, b.cond, b.guidance))
                with torch.no_grad():
                    target = two_step_target(teacher_spec, teacher, x, t, mid, prev, cond, uncond.to(x.device), w)
                a_t = broadcast_rows(alphas.to(x.device)[t], x)
                out = guided_output(student_spec, model, x, t, cond, uncond.to(x.device), w)
                weight = (a_t / (1 - a_t)).clamp_min(1.0)
                return (weight * (predicted_x0(student_spec, x, out, a_t) - target).square()).mean()
            return loss_fn

        return self.fit(context, student, make_loss, cfg.train_steps,
                        [{"params": list(student.parameters()), "lr": cfg.lr}], frozen=[teacher],
                        stage=f"round{index}", warmup=cfg.warmup,
                        description=f"progressive distillation {teacher_spec.steps} -> {student_spec.steps} steps")
