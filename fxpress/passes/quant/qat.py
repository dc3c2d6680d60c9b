"""BitsFusion's two-stage QAT as three passes: insert fake quantization, train, freeze into packed layers.

`InsertFakeQuant` takes the place of `QuantizeWeights` after bit allocation: every annotated layer
becomes a fake-quant layer (its allocated grid and width, scales from the recipe's initialisation or
LSQ's). `TrainQuantized` trains the model against the context's frozen teacher (stage I, distillation)
and then on noise prediction (stage II); other passes (step distillation) can train a fake-quant model
too. `FreezeQuantized` swaps each fake-quant layer for the same LowBitLinear/LowBitConv2d that PTQ
produces. Runs in one process or under torchrun (DDP) unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxpress.errors import PassError
from fxpress.ir.graph import Graph, output_tensors
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.context import PassContext
from fxpress.passes.distill.features import FeatureTap, block_modules
from fxpress.passes.module_edit import replace_submodule
from fxpress.passes.quant.fake_quant import fake_quant_module, lsq_scales
from fxpress.passes.quant.qat_config import QATConfig
from fxpress.passes.quant.quantize import lowbit_module
from fxpress.passes.quant.scale_cache import forget_scales, recall_scale
from fxpress.passes.quant.scale_init import fit_scales
from fxpress.passes.training_pass import TrainingPass
from fxpress.training.loop import step_generator
from fxpress.training.objectives import draw_timesteps, guided_prediction, kd_loss, noised_batch

__all__ = ["FreezeQuantized", "InsertFakeQuant", "TrainQuantized", "draw_timesteps",
           "fake_quant_layers", "qat_passes"]


def fake_quant_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Return the fake-quant layers of `module` by module path (those with a learnable `log_scale`)."""
    return {name: m for name, m in module.named_modules() if hasattr(m, "frozen") and hasattr(m, "log_scale")}


class InsertFakeQuant(Pass):
    """Replace every layer that has an allocated width by a fake-quant twin (scales from the recipe's
    initialisation or LSQ's)."""

    requires = ("bits",)
    provides = ("fake_quant",)
    transforms = True

    def __init__(self, scale_init: str = "recipe"):
        self.scale_init = scale_init

    @torch.no_grad()
    def run(self, graph: Graph) -> PassResult:
        count = 0
        for path, ann in graph.annotations().items():
            spec = ann.quant
            if spec is None:
                continue
            module = graph.module.get_submodule(path)
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise PassError(f"layer is a {type(module).__name__}, not Linear/Conv2d", self.name,
                                node=graph.layers[path].nodes[0], module_path=path)
            w2d = module.weight.detach().reshape(module.weight.shape[0], -1).float()
            if self.scale_init == "lsq":
                scale = lsq_scales(w2d, spec)
            else:
                scale = recall_scale(graph, path, spec)
                scale = fit_scales(w2d, spec) if scale is None else scale
            replace_submodule(graph.module, path, fake_quant_module(module, spec, scale.float()))
            count += 1
        return PassResult(graph, True, {"layers": count, "scale_init": self.scale_init})


class TrainQuantized(TrainingPass):
    """Two-stage QAT of a fake-quantized model: stage I distils the context's teacher (CFG-aware, block
    features, Beta timesteps as configured), stage II fine-tunes on noise prediction."""

    requires = ("fake_quant",)
    provides = ("qat",)

    def __init__(self, config: QATConfig):
        self.config = config.validate()

    def train(self, graph: Graph, context: PassContext) -> PassResult:
        data = context.require_data(self.name, "quantization-aware training")
        teacher = context.require_teacher(self.name)
        fake = fake_quant_layers(graph.module)
        if not fake:
            raise PassError("the model has no fake-quant layers: run InsertFakeQuant first", self.name)
        report: dict = {"layers": len(fake), "config": vars(self.config)}
        for stage, steps in ((1, self.config.stage1_steps), (2, self.config.stage2_steps)):
            if steps:
                report[f"stage{stage}"] = self._stage(context, stage, steps, graph.module, teacher, data, fake)
                report["world_size"] = report[f"stage{stage}"]["world_size"]
        return PassResult(graph, True, report)

    def _stage(self, context: PassContext, stage: int, steps: int, student: nn.Module, teacher: nn.Module, data,
               fake: dict[str, nn.Module]) -> dict:
        cfg = self.config
        scales = [m.log_scale for m in fake.values()]
        scale_ids = {id(p) for p in scales}
        others = [p for p in student.parameters() if id(p) not in scale_ids]
        groups = [{"params": others, "lr": cfg.lr}, {"params": scales, "lr": cfg.scale_lr}]
        taps = None
        if stage == 1 and cfg.feature_distill > 0:
            taps = (FeatureTap(block_modules(student)), FeatureTap(block_modules(teacher)))
        mode = cfg.timesteps if stage == 1 else cfg.stage2_timesteps
        seed = cfg.seed * 10 + stage

        def make_loss(model, ctx):
            def loss_fn(step: int) -> torch.Tensor:
                b = noised_batch(data, step_generator(seed, step), cfg.batch, timesteps=mode, beta=cfg.beta,
                                 prompt_dropout=cfg.prompt_dropout, guidance=cfg.guidance).shard(ctx)
                if stage == 2:
                    return F.mse_loss(data.predict(model, b.noisy, b.t, b.cond), data.target(b.x0, b.noise, b.t))
                if cfg.cfg_distill:
                    out = guided_prediction(data, model, b.noisy, b.t, b.cond, b.guidance)
                    with torch.no_grad():
                        ref = guided_prediction(data, teacher, b.noisy, b.t, b.cond, b.guidance)
                else:
                    out = data.predict(model, b.noisy, b.t, b.cond)
                    with torch.no_grad():
                        ref = data.predict(teacher, b.noisy, b.t, b.cond)
                feats_s, feats_t = (taps[0].values, taps[1].values) if taps else (None, None)
                return kd_loss(out, ref, feats_s, feats_t, feature_weight=cfg.feature_distill, normalize="none")
            return loss_fn

        try:
            result = self.fit(context, student, make_loss, steps, groups, frozen=[teacher], stage=f"stage{stage}",
                              description=f"QAT stage {'I' if stage == 1 else 'II'}")
        finally:
            if taps is not None:
                taps[0].close()
                taps[1].close()
        return {**result, "timesteps": mode}


class FreezeQuantized(Pass):
    """Swap each fake-quant layer for its packed low-bit twin; the report gives the output change (~0).
    Needs no earlier pass: a model loaded with `fxpress.load_trainable` arrives fake-quantized."""

    provides = ("quantized",)
    transforms = True

    @torch.no_grad()
    def run(self, graph: Graph) -> PassResult:
        fake = fake_quant_layers(graph.module)
        graph.module.eval().requires_grad_(False)
        before = graph.run()
        for path, module in fake.items():
            codes, scale = module.frozen()
            spec = module.spec
            w2d = module.weight.reshape(module.weight.shape[0], -1).float()
            deq = codes.float() * scale.float().unsqueeze(1)
            if path in graph.layers:  # a model captured fake-quantized shows no plain layer there
                graph.annotation(path).weight_error = float((deq - w2d).norm() / w2d.norm().clamp_min(1e-30))
            replace_submodule(graph.module, path, lowbit_module(module, codes, scale, spec.qmin, spec.levels))
        after = graph.run()
        num = sum(float((a - b).square().sum()) for a, b in zip(output_tensors(before), output_tensors(after)))
        den = sum(float(b.square().sum()) for b in output_tensors(before))
        forget_scales(graph)
        return PassResult(graph, True, {"layers": len(fake), "freeze_rel_error": (num / max(den, 1e-30)) ** 0.5})


def qat_passes(config: QATConfig) -> list[Pass]:
    """Return BitsFusion's QAT as passes: insert fake quantization, train both stages, freeze."""
    config = config.validate()
    return [InsertFakeQuant(config.scale_init), TrainQuantized(config), FreezeQuantized()]
