"""Reward fine-tuning recipes (TextCraftor, PAPERS.md §4): tune a testbed's text encoder, its denoiser, or both.

`TuneRecipe` says which rewards with which weights, which part trains ("encoder", the default and
TextCraftor proper; "denoiser"; or "encoder+denoiser": the encoder first, then the denoiser on the tuned
and frozen encoder, as TextCraftor's README advises), and how (`RewardConfig`: steps, batch, learning
rate, K sampler steps with gradients, random truncation, checkpointing, EMA). Rewards named in `keep` are
constraints, not objectives: their level on the original model is measured once before training
(`reward_levels`) and each pulls only while a batch falls below it. `tune` runs it as
`RewardFinetune` passes over captured graphs and returns the testbed with its tuned parts, whose
weights keep the original classes' names (a LoRA trained on the denoiser is folded in).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fxpress.errors import RecipeError
from fxpress.frontends.capture import capture
from fxpress.passes.context import PassContext
from fxpress.passes.pipeline import Pipeline
from fxpress.passes.reward.finetune import RewardConfig, RewardFinetune
from fxpress.passes.reward.levels import reward_levels
from fxpress.passes.rewire.fuse import merged_state_dict
from fxpress.passes.rewire.lora import InsertLoRA
from fxpress.testbed.classifier import FactorClassifier
from fxpress.testbed.models import Testbed
from fxpress.testbed.training_data import noisy_inputs
from fxpress.testbed.tuning import make_rewards, prompt_set, prompt_split, sampler_spec
from fxpress.training.prompt_set import PromptSet

TARGETS = ("encoder", "denoiser", "encoder+denoiser")
LORA_BRANCH = "reward"
LEVEL_SEED = 2 ** 31 - 1  # the floors' noise: one for every training seed, apart from the training draws


@dataclass(frozen=True)
class TuneRecipe:
    """Reward fine-tuning: `rewards` as (name, weight) pairs, the `target` part(s), the encoder stage's
    `train` settings and the denoiser stage's (`denoiser_train`, default: `train`'s), and for the denoiser
    a LoRA of rank `lora_rank` on the layers `lora_targets` selects (0: every weight trains). Rewards named
    in `keep` must not fall below the original model's level, measured on `keep_samples` training-prompt
    samples; they pull only while a batch's mean is below it (the alignment constraint, as a hinge)."""

    rewards: tuple[tuple[str, float], ...] = (("alignment", 1.0),)
    target: str = "encoder"
    train: RewardConfig = field(default_factory=lambda: RewardConfig(steps=100, batch=8, lr=1e-4))
    denoiser_train: RewardConfig | None = None
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = (r"to_(q|k|v|out\.0)",)
    keep: tuple[str, ...] = ()
    keep_samples: int = 256

    @property
    def stages(self) -> list[str]:
        """The parts trained, in order."""
        return self.target.split("+")

    @property
    def denoiser_config(self) -> RewardConfig:
        """The denoiser stage's settings: `denoiser_train`, else `train`'s less the encoder's trust region."""
        if self.denoiser_train is not None:
            return self.denoiser_train
        if self.target == "denoiser":
            return self.train
        return dataclasses.replace(self.train, drift_limit=None)

    def validate(self) -> TuneRecipe:
        """Return self, or raise RecipeError naming the first invalid field."""
        if self.target not in TARGETS:
            raise RecipeError(f"tune target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not self.rewards:
            raise RecipeError("tune needs at least one reward (name=weight)")
        names = [n for n, _ in self.rewards]
        if len(set(names)) != len(names):
            raise RecipeError(f"tune: a reward is named twice in {names}")
        for name, weight in self.rewards:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise RecipeError(f"tune: reward {name!r} needs a finite weight, got {weight!r}")
        for config in (self.train, self.denoiser_train):
            if config is not None:
                if not isinstance(config, RewardConfig):
                    raise RecipeError(f"tune: train settings must be a RewardConfig, got {type(config).__name__}")
                config.validate()
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise RecipeError(f"tune: lora_rank must be 0 (train every denoiser weight) or a positive rank, got "
                              f"{self.lora_rank!r}")
        stray = [name for name in self.keep if name not in names]
        if stray:
            raise RecipeError(f"tune: keep names {stray}, which are not among the rewards {names}; a kept reward "
                              "needs a weight (its strength below the floor)")
        if isinstance(self.keep_samples, bool) or not isinstance(self.keep_samples, int) or self.keep_samples < 1:
            raise RecipeError(f"tune: keep_samples must be a positive integer, got {self.keep_samples!r}")
        if "denoiser" in self.stages and self.denoiser_config.drift_limit is not None:
            raise RecipeError("tune: drift_limit bounds the tuned encoder's embeddings; the denoiser stage keeps "
                              "the encoder frozen, so its settings need drift_limit=None")
        if self.lora_rank and "denoiser" not in self.stages:
            raise RecipeError("tune: lora_rank applies to the denoiser stage; set target to 'denoiser' or "
                              "'encoder+denoiser'")
        return self


def parse_rewards(items: list[str]) -> tuple[tuple[str, float], ...]:
    """Return (name, weight) pairs from 'name=weight' strings ('bright=1', 'alignment=0.5'); a bare name
    weighs 1. RecipeError names a malformed item."""
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise RecipeError(f"--reward takes NAME=WEIGHT (for example bright=1), got {item!r}") from None
        if not name or not math.isfinite(weight):
            raise RecipeError(f"--reward takes NAME=WEIGHT with a finite weight, got {item!r}")
        out.append((name, weight))
    return tuple(out)


@dataclass
class TuneResult:
    """The testbed with its tuned parts (a copy; the input is untouched) and each stage's pass report."""

    testbed: Testbed
    reports: list[dict[str, Any]]


def tune(testbed: Testbed, recipe: TuneRecipe, *, classifier: FactorClassifier | None = None,
         prompts: PromptSet | None = None, checkpoint_dir: str | Path | None = None,
         resume: bool = False) -> TuneResult:
    """Run `recipe` on `testbed` (training prompts: `prompts`, default the testbed's training split; the
    alignment reward's `classifier`: see `fxpress.testbed.tuning.reward_classifier`) and return the tuned
    testbed. Checkpoints go under `checkpoint_dir` per stage; `resume` continues from them. The floors of
    the kept rewards (measured on the original, for every stage) are in each stage's report."""
    recipe = recipe.validate()
    rewards = make_rewards(testbed, dict(recipe.rewards), classifier)
    prompts = prompts if prompts is not None else prompt_set(testbed, prompt_split(testbed)[0])
    spec = sampler_spec(testbed)
    shape = (testbed.spec.channels, testbed.spec.resolution, testbed.spec.resolution)
    if recipe.keep:
        levels = reward_levels(rewards, spec, testbed.text_encoder, testbed.denoiser, prompts, shape,
                               recipe.keep_samples, seed=LEVEL_SEED)
        rewards = rewards.with_floors({name: levels[name] for name in recipe.keep})
    encoder, denoiser = copy.deepcopy(testbed.text_encoder), copy.deepcopy(testbed.denoiser)
    reports = []
    for stage in recipe.stages:
        folder = None if checkpoint_dir is None else Path(checkpoint_dir) / stage
        if stage == "encoder":
            graph = capture(encoder, (prompts.input_ids[:2],))
            passes = [RewardFinetune(rewards, spec, shape, recipe.train)]
            components = {"denoiser": denoiser, "prompts": prompts}
        else:
            graph = capture(denoiser, (), noisy_inputs(testbed, [500], 0)[0])
            config = recipe.denoiser_config
            passes = [RewardFinetune(rewards, spec, shape, config, target="denoiser")]
            if recipe.lora_rank:
                passes = [InsertLoRA(list(recipe.lora_targets), rank=recipe.lora_rank, name=LORA_BRANCH,
                                     seed=config.seed),
                          RewardFinetune(rewards, spec, shape, config, target="denoiser", branches=(LORA_BRANCH,))]
            components = {"text_encoder": encoder, "prompts": prompts}
        context = PassContext(components=components, checkpoint_dir=folder, resume=resume)
        tuned, report = Pipeline(passes).run(graph, context)
        reports.append({"stage": stage, **report.passes[-1].details, "floors": dict(rewards.floors)})
        if stage == "encoder":
            encoder = tuned.module
        else:
            plain = copy.deepcopy(denoiser)
            plain.load_state_dict(merged_state_dict(tuned.module))
            denoiser = plain
    out = copy.copy(testbed)
    out.text_encoder, out.denoiser = encoder.eval().requires_grad_(False), denoiser.eval().requires_grad_(False)
    return TuneResult(out, reports)


__all__ = ["TARGETS", "TuneRecipe", "TuneResult", "parse_rewards", "tune"]
