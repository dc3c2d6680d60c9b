"""`QuantAwareTraining`: BitsFusion's two-stage QAT as a pass, ending in packed low-bit layers.

It takes the place of `QuantizeWeights` after bit allocation: every annotated layer becomes a
fake-quant layer (its allocated grid and width, scales from the recipe's initialisation or LSQ's),
the model is trained against a frozen copy of itself (stage I, distillation) and then on noise
prediction (stage II), and each layer is frozen into the same LowBitLinear/LowBitConv2d that PTQ
produces. Runs in one process or under torchrun (DDP) unchanged.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxpress.errors import PassError
from fxpress.ir.graph import Graph, output_tensors
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.distill.features import FeatureTap, block_modules
from fxpress.passes.module_edit import replace_submodule
from fxpress.passes.quant.fake_quant import fake_quant_module, lsq_scales
from fxpress.passes.quant.qat_config import QATConfig
from fxpress.passes.quant.quantize import lowbit_module
from fxpress.passes.quant.scale_cache import forget_scales, recall_scale
from fxpress.passes.quant.scale_init import fit_scales
from fxpress.training.diffusion_data import DiffusionData
from fxpress.training.distributed import Distributed, unwrap
from fxpress.training.loop import step_generator, train_loop


def draw_timesteps(gen: torch.Generator, size: int, total: int, mode: str, beta: tuple[float, float]) -> torch.Tensor:
    """Return `size` integer timesteps in [0, total): uniform, or Beta(a, b) scaled to the range.

    Beta(3, 1) (BitsFusion) favours large t, where quantization error is largest. Draws are
    deterministic in `gen`.
    """
    if mode == "uniform":
        return torch.randint(0, total, (size,), generator=gen)
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    fraction = torch.from_numpy(rng.beta(beta[0], beta[1], size))
    return (fraction * total).long().clamp_(0, total - 1)


class QuantAwareTraining(Pass):
    """Fake-quantize every annotated layer, run two-stage QAT, then freeze into packed low-bit layers.

    Needs `graph.training_data` (a DiffusionData; `fxpress.compress(..., training_data=...)`).
    """

    requires = ("bits",)
    provides = ("quantized", "qat")
    transforms = True

    def __init__(self, config: QATConfig):
        self.config = config.validate()

    def run(self, graph: Graph) -> PassResult:
        data: DiffusionData | None = getattr(graph, "training_data", None)
        if data is None:
            raise PassError("quantization-aware training needs training data: pass training_data= (a "
                            "DiffusionData) to fxpress.compress, or compress a testbed model", self.name)
        teacher = copy.deepcopy(graph.module).eval().requires_grad_(False)
        fake = self._insert_fake_quant(graph)
        ctx = Distributed.from_env()
        report: dict = {"layers": len(fake), "world_size": ctx.world, "config": vars(self.config)}
        with torch.enable_grad():
            student = graph.module.train().requires_grad_(True)
            for stage, steps in ((1, self.config.stage1_steps), (2, self.config.stage2_steps)):
                if steps:
                    report[f"stage{stage}"] = self._train(stage, steps, student, teacher, data, ctx, fake)
        graph.module.eval().requires_grad_(False)
        report["freeze_rel_error"] = self._freeze(graph, fake)
        forget_scales(graph)
        return PassResult(graph, True, report)

    @torch.no_grad()
    def _insert_fake_quant(self, graph: Graph) -> dict[str, nn.Module]:
        fake = {}
        for path, ann in graph.annotations().items():
            spec = ann.quant
            if spec is None:
                continue
            module = graph.module.get_submodule(path)
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise PassError(f"layer is a {type(module).__name__}, not Linear/Conv2d", self.name,
                                node=graph.layers[path].nodes[0], module_path=path)
            w2d = module.weight.detach().reshape(module.weight.shape[0], -1).float()
            if self.config.scale_init == "lsq":
                scale = lsq_scales(w2d, spec)
            else:
                scale = recall_scale(graph, path, spec)
                scale = fit_scales(w2d, spec) if scale is None else scale
            fake[path] = fake_quant_module(module, spec, scale.float())
            replace_submodule(graph.module, path, fake[path])
        return fake

    def _train(self, stage: int, steps: int, student: nn.Module, teacher: nn.Module, data: DiffusionData,
               ctx: Distributed, fake: dict[str, nn.Module]) -> dict:
        cfg = self.config
        scales = [m.log_scale for m in fake.values()]
        scale_ids = {id(p) for p in scales}
        others = [p for p in student.parameters() if id(p) not in scale_ids]
        optimizer = torch.optim.AdamW([{"params": others, "lr": cfg.lr}, {"params": scales, "lr": cfg.scale_lr}],
                                      weight_decay=0.0)
        model = ctx.wrap(student)
        teacher = teacher.to(ctx.device)
        taps = None
        if stage == 1 and cfg.feature_distill > 0:
            blocks_s, blocks_t = block_modules(student), block_modules(teacher)
            taps = (FeatureTap(blocks_s), FeatureTap(blocks_t))
        uncond = data.unconditional.to(ctx.device)
        mode = cfg.timesteps if stage == 1 else cfg.stage2_timesteps
        seed = cfg.seed * 10 + stage

        def loss_fn(step: int) -> torch.Tensor:
            gen = step_generator(seed, step)
            x0, cond = data.batch(gen, cfg.batch)
            noise = torch.randn(x0.shape, generator=gen)
            t = draw_timesteps(gen, cfg.batch, data.num_timesteps, mode, cfg.beta)
            drop = torch.rand(cfg.batch, generator=gen) < cfg.prompt_dropout
            cond = torch.where(drop.view(-1, *[1] * (cond.dim() - 1)), uncond.expand_as(cond), cond)
            w = cfg.guidance[0] + (cfg.guidance[1] - cfg.guidance[0]) * torch.rand(cfg.batch, generator=gen)
            x0, noise, t, cond, w = (ctx.shard(v) for v in (x0, noise, t, cond, w))
            noisy = data.add_noise(x0, noise, t)
            if stage == 2:
                return F.mse_loss(data.predict(model, noisy, t, cond), data.target(x0, noise, t))
            if cfg.cfg_distill:
                both = (torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([uncond.expand_as(cond), cond]))
                out_s = data.predict(model, *both)
                with torch.no_grad():
                    out_t = data.predict(teacher, *both)
                w = w.view(-1, *[1] * (noisy.dim() - 1))
                (su, sc), (tu, tc) = out_s.chunk(2), out_t.chunk(2)
                loss = F.mse_loss(su + w * (sc - su), tu + w * (tc - tu))
            else:
                out_s = data.predict(model, noisy, t, cond)
                with torch.no_grad():
                    out_t = data.predict(teacher, noisy, t, cond)
                loss = F.mse_loss(out_s, out_t)
            feats = [F.mse_loss(taps[0].values[k], taps[1].values[k]) for k in taps[1].values] if taps else []
            if feats:  # a model without UNet/DiT blocks has no features to distill
                loss = loss + cfg.feature_distill * torch.stack(feats).mean()
            return loss

        began = time.perf_counter()
        try:
            losses = train_loop(loss_fn, optimizer, steps, ctx, {"student": student},
                                description=f"QAT stage {'I' if stage == 1 else 'II'}")
        finally:
            if taps is not None:
                taps[0].close()
                taps[1].close()
        unwrap(model)
        window = max(1, min(50, len(losses) // 4))
        return {"steps": steps, "seconds": round(time.perf_counter() - began, 1), "timesteps": mode,
                "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window}

    @torch.no_grad()
    def _freeze(self, graph: Graph, fake: dict[str, nn.Module]) -> float:
        """Swap each fake-quant layer for its packed twin; return the output change (should be ~0)."""
        before = graph.run()
        for path, module in fake.items():
            codes, scale = module.frozen()
            spec = module.spec
            w2d = module.weight.reshape(module.weight.shape[0], -1).float()
            deq = codes.float() * scale.float().unsqueeze(1)
            graph.annotation(path).weight_error = float((deq - w2d).norm() / w2d.norm().clamp_min(1e-30))
            replace_submodule(graph.module, path, lowbit_module(module, codes, scale, spec.qmin, spec.levels))
        after = graph.run()
        num = sum(float((a - b).square().sum()) for a, b in zip(output_tensors(before), output_tensors(after)))
        den = sum(float(b.square().sum()) for b in output_tensors(before))
        return (num / max(den, 1e-30)) ** 0.5
