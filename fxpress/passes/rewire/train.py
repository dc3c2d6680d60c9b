"""`TrainBranches`: train adapter branches (and, if asked, named base layers) on the denoising loss.

The loss is the model's own training objective on the context's data: noise (or velocity) prediction
MSE at uniform timesteps, with a share of conditions dropped to the unconditional one so guidance keeps
working. It runs on the one `train_student` (DDP under torchrun, checkpoints, resume, finite-loss
check); with `ema` set, an exponential moving average of the trained parameters is kept, checkpointed
with them, and written into the model at the end.

The data's further inputs (`DiffusionData.inputs`: an image adapter's reference features, a control
branch's map) reach the model by keyword; branches not named are frozen, so a train-only branch trained
first (a LoRA on the fine-tuning set, a control branch) keeps supplying what it learned while the next
one trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxpress.errors import RecipeError
from fxpress.ir.graph import Graph
from fxpress.ir.select import select
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear
from fxpress.passes.base import PassResult
from fxpress.passes.context import PassContext
from fxpress.passes.quant.select_layers import layer_candidates
from fxpress.passes.rewire.branches import branch_modules, registry, resolve_names
from fxpress.passes.training_pass import TrainingPass
from fxpress.training.loop import EMA, step_generator
from fxpress.training.objectives import noised_batch


@dataclass(frozen=True)
class AdapterConfig:
    """What trains and how: `branches` (None: every unfused branch), `also_train` (layer selectors of base
    layers trained too, at `base_lr`), steps, batch, learning rates, EMA decay (None: no EMA), the share of
    unconditional rows and the seed."""

    branches: tuple[str, ...] | None = None
    also_train: tuple[str, ...] = ()
    steps: int = 200
    batch: int = 16
    lr: float = 1e-3
    base_lr: float = 1e-5
    warmup: int = 0
    ema: float | None = None
    prompt_dropout: float = 0.1
    input_dropout: float = 0.05
    seed: int = 0

    def validate(self) -> AdapterConfig:
        """Return self, or raise RecipeError naming the first invalid field."""
        for name in ("steps", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RecipeError(f"adapter training: {name} must be a positive integer, got {value!r}")
        if not (self.lr > 0 and self.base_lr > 0):
            raise RecipeError(f"adapter training: lr and base_lr must be positive, got {self.lr}, {self.base_lr}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise RecipeError(f"adapter training: ema must be a decay in (0, 1) or None, got {self.ema}")
        if not (0.0 <= self.prompt_dropout < 1.0 and 0.0 <= self.input_dropout < 1.0) or self.warmup < 0:
            raise RecipeError("adapter training: prompt_dropout and input_dropout must be in [0, 1) and warmup >= 0")
        return self


def branch_parameters(graph: Graph, names: list[str]) -> list[nn.Parameter]:
    """The trainable parameters of branches `names`: a LoRA's A and B factors, an image adapter's projector
    and image keys and values, a control branch's copy and zero projections."""
    params: dict[int, nn.Parameter] = {}
    for name in names:
        if registry(graph)[name].get("fused"):
            raise RecipeError(f"branch {name!r} is fused into its base weights; unfuse it before training it")
        for path in branch_modules(graph, name):
            params.update({id(p): p for p in graph.module.get_submodule(path).parameters()})
    return list(params.values())


def base_parameters(graph: Graph, selectors: tuple[str, ...]) -> dict[str, list[nn.Parameter]]:
    """{layer path: parameters} of the base layers `selectors` name (branch layers excluded); RecipeError for
    low-bit layers, whose packed codes cannot train."""
    if not selectors:
        return {}
    candidates = {p: v for p, v in layer_candidates(graph).items() if graph.annotation(p).branch is None}
    chosen = select(selectors, candidates, what="also_train selector")
    packed = [p for p in chosen if isinstance(graph.module.get_submodule(p), (LowBitLinear, LowBitConv2d))]
    if packed:
        raise RecipeError(f"also_train names packed low-bit layers ({', '.join(packed[:3])}); their codes cannot "
                          "train: load the artifact with fxpress.load_trainable, or train the branches only")
    return {p: list(graph.module.get_submodule(p).parameters(recurse=False)) for p in chosen}


class TrainBranches(TrainingPass):
    """Train branches on the denoising loss (see the module docstring)."""

    needs_teacher = False

    def __init__(self, config: AdapterConfig | None = None):
        self.config = (config or AdapterConfig()).validate()

    def train(self, graph: Graph, context: PassContext) -> PassResult:
        cfg = self.config
        data = context.require_data(self.name, "adapter training")
        entries = registry(graph)
        names = list(cfg.branches) if cfg.branches is not None else [n for n, e in entries.items()
                                                                       if not e.get("fused")]
        names = resolve_names(graph, names, self.name)
        if not names:
            raise RecipeError(f"{self.name}: the model has no branches to train; insert one first (InsertLoRA)")
        branch = branch_parameters(graph, names)
        base = base_parameters(graph, cfg.also_train)
        groups = [{"params": branch, "lr": cfg.lr}]
        base_params = [p for ps in base.values() for p in ps]
        if base_params:
            groups.append({"params": base_params, "lr": cfg.base_lr})
        tracked = nn.ParameterList([*branch, *base_params])
        ema = EMA(tracked, cfg.ema) if cfg.ema is not None else None

        def make_loss(model, ctx):
            def loss_fn(step: int) -> torch.Tensor:
                b = noised_batch(data, step_generator(cfg.seed, step), cfg.batch, prompt_dropout=cfg.prompt_dropout,
                                 input_dropout=cfg.input_dropout).shard(ctx)
                return F.mse_loss(data.predict(model, b.noisy, b.t, b.cond, b.inputs),
                                  data.target(b.x0, b.noise, b.t))
            return loss_fn

        report = self.fit(context, graph.module, make_loss, cfg.steps, groups, warmup=cfg.warmup,
                          description="adapter training", extra_modules={"ema": ema} if ema else None,
                          after_step=(lambda step: ema.update(tracked, step)) if ema else None)
        if ema is not None:
            ema.copy_to(tracked)
        return PassResult(graph, True, {**report, "branches": names, "also_train": sorted(base),
                                        "trained_params": sum(p.numel() for p in tracked), "ema": cfg.ema})
