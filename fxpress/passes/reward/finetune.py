"""`RewardFinetune`: tune a text encoder or a denoiser on differentiable rewards through the sampler (TextCraftor).

target "encoder" (the default, TextCraftor proper): the Graph is the text encoder (input: token ids;
output: hidden states). Each update draws prompts and seeded noise, encodes the prompts with the encoder
being tuned and with the frozen original (the context's teacher), and samples with the frozen denoiser
(`context.components["denoiser"]`): the early steps on the original's embeddings without gradients, the
last K with the tuned embeddings and gradients (`training.reward_sampling`).

target "denoiser": the Graph is the denoiser and the text encoder is frozen
(`context.components["text_encoder"]`); every step samples with the denoiser being tuned, the last K
with gradients. `branches` limits the trained weights to named branches (a LoRA from `InsertLoRA`);
otherwise every floating-point weight trains. Encoder first, then the denoiser on the tuned encoder, is
TextCraftor's advice (`fxpress.tune`).

The loss is −Σ wᵢ·mean(rᵢ) of the images (`WeightedRewards`), on the shared training loop (progress,
resume, torchrun, EMA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fxpress.errors import FxpressError, PassError, RecipeError
from fxpress.ir.graph import Graph
from fxpress.ir.sampler import SamplerSpec
from fxpress.passes.base import PassResult
from fxpress.passes.context import PassContext
from fxpress.passes.rewire.branches import resolve_names
from fxpress.passes.rewire.train import branch_parameters
from fxpress.passes.training_pass import TrainingPass
from fxpress.training.loop import EMA, step_generator
from fxpress.training.prompt_set import PromptSet, encode_ids
from fxpress.training.reward_sampling import check_grad_steps, draw_grad_steps, moving_steps, truncated_sample
from fxpress.training.rewards import WeightedRewards
from fxpress.training.trust_region import drift_penalty, relative_drift


@dataclass(frozen=True)
class RewardConfig:
    """How the model tunes: steps, global batch, learning rate, K = sampler steps with gradients (None:
    all), `random_truncation` (K drawn from 1..K per update, AlignProp), checkpointing, EMA decay (None:
    off), the seed of prompts and noise, and for the encoder a trust region: past a relative distance
    `drift_limit` (None: off) between the tuned and the original embeddings, a penalty of weight
    `drift_weight` pulls back (`training.trust_region`)."""

    steps: int = 100
    batch: int = 8
    lr: float = 1e-5
    grad_steps: int | None = 5
    random_truncation: bool = False
    checkpoint: bool = True
    ema: float | None = None
    seed: int = 0
    drift_limit: float | None = None
    drift_weight: float = 100.0

    def validate(self) -> RewardConfig:
        """Return self, or raise RecipeError naming the first invalid field."""
        for name in ("steps", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"reward fine-tuning: {name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise RecipeError(f"reward fine-tuning: lr must be positive, got {self.lr!r}")
        try:
            check_grad_steps(self.grad_steps, 10 ** 9)
        except FxpressError as exc:
            raise RecipeError(f"reward fine-tuning: {exc}") from exc
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise RecipeError(f"reward fine-tuning: ema must be a decay in (0, 1) or None, got {self.ema!r}")
        if self.drift_limit is not None and not (isinstance(self.drift_limit, (int, float))
                                                 and math.isfinite(self.drift_limit) and self.drift_limit >= 0):
            raise RecipeError("reward fine-tuning: drift_limit must be a relative distance >= 0 (0.1: 10%) or None, "
                              f"got {self.drift_limit!r}")
        if not (isinstance(self.drift_weight, (int, float)) and math.isfinite(self.drift_weight)
                and self.drift_weight > 0):
            raise RecipeError(f"reward fine-tuning: drift_weight must be a positive number, got {self.drift_weight!r}")
        return self



TARGETS = ("encoder", "denoiser")


class RewardFinetune(TrainingPass):
    """Tune the Graph (a text encoder, or with target="denoiser" a denoiser) on `rewards` through
    `sampler` (see the module docstring).

    `shape` is one image's (C, H, W) as the denoiser takes it. Needs `context.components["prompts"]` (a
    `PromptSet`) and the frozen other half: `components["denoiser"]` when tuning the encoder (whose
    teacher is the encoder before the pass), `components["text_encoder"]` when tuning the denoiser.
    """

    def __init__(self, rewards: WeightedRewards, sampler: SamplerSpec, shape: tuple[int, ...],
                 config: RewardConfig | None = None, target: str = "encoder", branches: tuple[str, ...] = ()):
        if target not in TARGETS:
            raise RecipeError(f"reward fine-tuning: target must be one of {', '.join(TARGETS)}, got {target!r}")
        if target != "encoder" and config is not None and config.drift_limit is not None:
            raise RecipeError("reward fine-tuning: drift_limit bounds the tuned encoder's embeddings; the "
                              f"{target} is tuned on a frozen encoder, so leave it None")
        if branches and target != "denoiser":
            raise RecipeError("reward fine-tuning: branches are trained on the denoiser; set target='denoiser'")
        self.rewards, self.sampler, self.shape = rewards, sampler, tuple(int(s) for s in shape)
        self.config = (config or RewardConfig()).validate()
        self.target, self.branches = target, tuple(branches)
        self.needs_teacher = target == "encoder"  # the encoder's early steps use the original's embeddings

    def _frozen_part(self, context: PassContext) -> nn.Module:
        other = "denoiser" if self.target == "encoder" else "text_encoder"
        module = context.components.get(other)
        if not isinstance(module, nn.Module):
            raise PassError(f"reward fine-tuning of the {self.target} samples with a frozen {other}: pass "
                            f"components={{'{other}': model, 'prompts': PromptSet(...)}}", self.name)
        return module

    def _trained(self, graph: Graph) -> list[nn.Parameter]:
        if self.branches:
            return branch_parameters(graph, resolve_names(graph, self.branches, self.name))
        return [p for p in graph.module.parameters() if p.is_floating_point()]

    def train(self, graph: Graph, context: PassContext) -> PassResult:
        cfg = self.config
        if not cfg.random_truncation and moving_steps(self.sampler, cfg.grad_steps) == 0:
            raise RecipeError(f"reward fine-tuning: the last {cfg.grad_steps} sampler step(s) (timesteps "
                              f"{list(self.sampler.timesteps[-cfg.grad_steps:])}) leave the sample as it is "
                              "(their alpha equals the next one's), so no gradient would reach the model; give "
                              "more grad_steps")
        frozen_part = self._frozen_part(context)
        prompts = context.components.get("prompts")
        if not isinstance(prompts, PromptSet):
            raise PassError("reward fine-tuning needs components['prompts'], a PromptSet of token ids and "
                            "targets", self.name)
        tuning_encoder = self.target == "encoder"
        original = context.require_teacher(self.name) if tuning_encoder else frozen_part
        denoiser = frozen_part if tuning_encoder else None
        params = self._trained(graph)
        tracked = nn.ParameterList(params)
        ema = EMA(tracked, cfg.ema) if cfg.ema is not None else None
        frozen_part.eval().requires_grad_(False)
        self.rewards.eval().requires_grad_(False)
        last: dict[str, float] = {}
        drifts: list[float] = []

        def make_loss(model, ctx):
            def loss_fn(step: int) -> torch.Tensor:
                gen = step_generator(cfg.seed, step)
                ids, targets = prompts.draw(gen, cfg.batch)
                noise = torch.randn((cfg.batch, *self.shape), generator=gen)
                k = draw_grad_steps(gen, min(cfg.grad_steps or self.sampler.steps, self.sampler.steps)) \
                    if cfg.random_truncation else cfg.grad_steps
                ids, noise = ctx.shard(ids), ctx.shard(noise)
                targets = {name: ctx.shard(v) for name, v in targets.items()}
                uncond_ids = prompts.unconditional.to(ctx.device)
                both = torch.cat([ids, uncond_ids])  # one forward each (DDP wants one per update)
                with torch.no_grad():
                    frozen, frozen_uncond = encode_ids(original, both).split([len(ids), 1])
                if tuning_encoder:
                    cond, uncond = encode_ids(model, both).split([len(ids), 1])
                    sampler_model = denoiser
                else:
                    cond, uncond, sampler_model = frozen, frozen_uncond, model
                images = truncated_sample(self.sampler, sampler_model, noise, cond, uncond, grad_steps=k,
                                          frozen_cond=frozen, frozen_uncond=frozen_uncond,
                                          checkpoint=cfg.checkpoint)
                loss, means = self.rewards.loss(images, targets)
                last.update(means)
                if tuning_encoder:
                    drift = 0.5 * (relative_drift(cond, frozen) + relative_drift(uncond, frozen_uncond))
                    drifts.append(float(drift.detach()))
                    if cfg.drift_limit is not None:
                        loss = loss + drift_penalty(drift, cfg.drift_limit, cfg.drift_weight)
                return loss
            return loss_fn

        report = self.fit(context, graph.module, make_loss, cfg.steps, [{"params": params, "lr": cfg.lr}],
                          frozen=[original, frozen_part, self.rewards],
                          description=f"reward fine-tuning ({self.target})",
                          extra_modules={"ema": ema} if ema else None,
                          after_step=(lambda step: ema.update(tracked, step)) if ema else None)
        if ema is not None:
            ema.copy_to(tracked)
        return PassResult(graph, True, {**report, "target": self.target, "branches": list(self.branches),
                                        "trained_params": sum(p.numel() for p in params),
                                        "grad_steps": cfg.grad_steps,
                                        "random_truncation": cfg.random_truncation,
                                        "rewards_last_batch": dict(last), "weights": self.rewards.weights,
                                        "drift_limit": cfg.drift_limit,
                                        "drift_last_batch": math.sqrt(drifts[-1]) if drifts else None})
