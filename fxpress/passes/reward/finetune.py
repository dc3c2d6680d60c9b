"""`RewardFinetune`: tune a text encoder on differentiable rewards through the sampler (TextCraftor).

The Graph is the text encoder (input: token ids; output: hidden states). Each update draws prompts and
seeded noise, encodes the prompts with the encoder being tuned and with the frozen original (the
context's teacher), and samples with the frozen denoiser (`context.components["denoiser"]`): the early
steps on the original's embeddings without gradients, the last K with the tuned embeddings and
gradients (`training.reward_sampling`). The loss is −Σ wᵢ·mean(rᵢ) of the images (`WeightedRewards`);
only the encoder's weights move, with the shared training loop (progress, resume, torchrun, EMA).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fxpress.errors import FxpressError, PassError, RecipeError
from fxpress.ir.graph import Graph, output_tensors
from fxpress.ir.sampler import SamplerSpec
from fxpress.passes.base import PassResult
from fxpress.passes.context import PassContext
from fxpress.passes.training_pass import TrainingPass
from fxpress.training.loop import EMA, step_generator
from fxpress.training.reward_sampling import check_grad_steps, draw_grad_steps, truncated_sample
from fxpress.training.rewards import WeightedRewards


@dataclass
class PromptSet:
    """Training prompts as token ids (N, L), what each asks for ({factor: (N,) class, −1 where unsaid})
    and the unconditional prompt's ids (1, L)."""

    input_ids: torch.Tensor
    unconditional: torch.Tensor
    targets: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.unconditional.dim() != 2 or self.unconditional.shape[0] != 1 \
                or self.unconditional.shape[1] != self.input_ids.shape[1]:
            raise RecipeError(f"prompts: need ids (N, L) and unconditional ids (1, L), got "
                              f"{tuple(self.input_ids.shape)} and {tuple(self.unconditional.shape)}")
        bad = [k for k, v in self.targets.items() if v.shape != (self.input_ids.shape[0],)]
        if bad:
            raise RecipeError(f"prompts: targets {bad} need one value per prompt ({self.input_ids.shape[0]})")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def draw(self, generator: torch.Generator, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return `size` prompts drawn with replacement: (ids, targets)."""
        index = torch.randint(0, len(self), (size,), generator=generator)
        return self.input_ids[index], {k: v[index] for k, v in self.targets.items()}


@dataclass(frozen=True)
class RewardConfig:
    """How the encoder tunes: steps, global batch, learning rate, K = sampler steps with gradients (None:
    all), `random_truncation` (K drawn from 1..K per update, AlignProp), checkpointing, EMA decay (None:
    off) and the seed of prompts and noise."""

    steps: int = 100
    batch: int = 8
    lr: float = 1e-5
    grad_steps: int | None = 5
    random_truncation: bool = False
    checkpoint: bool = True
    ema: float | None = None
    seed: int = 0

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
        return self


def hidden_states(encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Return a text encoder's hidden states (N, L, width) for token ids (its first output tensor)."""
    return output_tensors(encoder(ids))[0]


class RewardFinetune(TrainingPass):
    """Tune the Graph's text encoder on `rewards` through `sampler` (see the module docstring).

    `shape` is one image's (C, H, W) as the denoiser takes it. Needs `context.components["denoiser"]`
    and `context.components["prompts"]` (a `PromptSet`); the teacher is the encoder before the pass.
    """

    def __init__(self, rewards: WeightedRewards, sampler: SamplerSpec, shape: tuple[int, ...],
                 config: RewardConfig | None = None):
        self.rewards, self.sampler, self.shape = rewards, sampler, tuple(int(s) for s in shape)
        self.config = (config or RewardConfig()).validate()

    def train(self, graph: Graph, context: PassContext) -> PassResult:
        cfg = self.config
        denoiser = context.components.get("denoiser")
        prompts = context.components.get("prompts")
        if not isinstance(denoiser, nn.Module):
            raise PassError("reward fine-tuning samples with a denoiser: pass components={'denoiser': model, "
                            "'prompts': PromptSet(...)}", self.name)
        if not isinstance(prompts, PromptSet):
            raise PassError("reward fine-tuning needs components['prompts'], a PromptSet of token ids and "
                            "targets", self.name)
        original = context.require_teacher(self.name)
        encoder = graph.module
        params = [p for p in encoder.parameters() if p.is_floating_point()]
        tracked = nn.ParameterList(params)
        ema = EMA(tracked, cfg.ema) if cfg.ema is not None else None
        denoiser.eval().requires_grad_(False)
        self.rewards.eval().requires_grad_(False)
        last: dict[str, float] = {}

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
                    frozen, frozen_uncond = hidden_states(original, both).split([len(ids), 1])
                cond, uncond = hidden_states(model, both).split([len(ids), 1])
                images = truncated_sample(self.sampler, denoiser, noise, cond, uncond, grad_steps=k,
                                          frozen_cond=frozen, frozen_uncond=frozen_uncond,
                                          checkpoint=cfg.checkpoint)
                loss, means = self.rewards.loss(images, targets)
                last.update(means)
                return loss
            return loss_fn

        report = self.fit(context, encoder, make_loss, cfg.steps, [{"params": params, "lr": cfg.lr}],
                          frozen=[original, denoiser, self.rewards], description="reward fine-tuning",
                          extra_modules={"ema": ema} if ema else None,
                          after_step=(lambda step: ema.update(tracked, step)) if ema else None)
        if ema is not None:
            ema.copy_to(tracked)
        return PassResult(graph, True, {**report, "grad_steps": cfg.grad_steps,
                                        "random_truncation": cfg.random_truncation,
                                        "rewards_last_batch": dict(last), "weights": self.rewards.weights})
