"""`GuidanceDistill`: fold classifier-free guidance into the network (one call per step instead of two)."""

from __future__ import annotations

import torch

from fxpress.ir.graph import Graph, Inputs
from fxpress.kernels.guidance import GUIDANCE_INPUT, GuidanceConditioned
from fxpress.passes.base import PassResult
from fxpress.passes.context import PassContext
from fxpress.passes.distill.config import DistillConfig
from fxpress.passes.distill.guidance_input import guidance_site
from fxpress.passes.distill.sampler_specs import base_spec, check_same_outputs, grid_spec
from fxpress.passes.training_pass import TrainingPass
from fxpress.training.loop import step_generator
from fxpress.training.objectives import guided_prediction, kd_loss, noised_batch


def with_guidance(inputs: Inputs, scale: float) -> Inputs:
    """Return `inputs` plus the guidance keyword (one weight per row of the batch)."""
    batch = inputs.batch_size or 1
    return Inputs(inputs.args, {**inputs.kwargs, GUIDANCE_INPUT: torch.full((batch,), float(scale))})


def add_guidance_input(graph: Graph, scale: float) -> Graph:
    """Return a new Graph of the graph's model wrapped to take a guidance weight (outputs unchanged while the
    embedding is at its zero initialisation); example and calibration inputs get `scale`."""
    site, width = guidance_site(graph)
    model = GuidanceConditioned(graph.module, site, width)
    new = graph.recapture(model, with_guidance(graph.example, scale))
    new.calibration = [with_guidance(c, scale) for c in graph.calibration]
    new.extras["wrapper"] = model.describe()
    return new


class GuidanceDistill(TrainingPass):
    """Add a zero-initialised guidance-weight embedding beside the time embedding and train the model to
    give, in one call with weight w, the teacher's guided prediction u + w (c - u) (w drawn from the range)."""

    provides = ("guidance_input",)

    def __init__(self, config: DistillConfig):
        self.config = config.validate()

    def train(self, graph: Graph, context: PassContext) -> PassResult:
        cfg = self.config
        data = context.require_data(self.name, "guidance distillation")
        teacher = context.require_teacher(self.name)
        base = base_spec(data, self.name)
        check_same_outputs(graph.module, teacher, data, self.name)
        if not isinstance(graph.module, GuidanceConditioned):
            graph = add_guidance_input(graph, cfg.guidance_scale)
        student = graph.module

        def make_loss(model, ctx):
            def loss_fn(step: int) -> torch.Tensor:
                b = noised_batch(data, step_generator(cfg.seed, step), cfg.batch, prompt_dropout=cfg.prompt_dropout,
                                 guidance=cfg.guidance).shard(ctx)
                with torch.no_grad():
                    ref = guided_prediction(data, teacher, b.noisy, b.t, b.cond, b.guidance)
                out = data.predict(lambda **kw: model(**kw, guidance=b.guidance), b.noisy, b.t, b.cond)
                return kd_loss(out, ref, normalize="none")
            return loss_fn

        embedding = list(student.embedding.parameters())
        ids = {id(p) for p in embedding}
        groups = [{"params": [p for p in student.parameters() if id(p) not in ids], "lr": cfg.lr},
                  {"params": embedding, "lr": cfg.lr * 10}]
        report = self.fit(context, student, make_loss, cfg.train_steps, groups, frozen=[teacher],
                          warmup=cfg.warmup, description="guidance distillation")
        spec = grid_spec(base, cfg.steps, guidance="embedded", guidance_scale=cfg.guidance_scale,
                         notes={"method": "guidance", "trained_guidance": list(cfg.guidance)})
        graph.extras["sampler"] = spec.to_json()
        return PassResult(graph, True, {**report, "site": student.site, "guidance": list(cfg.guidance),
                                        "sampler_steps": spec.steps, "calls_per_step": spec.calls_per_step})
