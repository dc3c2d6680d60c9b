"""`DistillConfig`: the settings of step distillation (guidance, progressive, adversarial), validated up front."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from fxpress.errors import RecipeError

METHODS = ("guidance", "progressive", "adversarial")
GUIDANCE_LIMIT = 30.0  # guidance weights above this are a typo, not a setting
STUDENT_PREDICTIONS = ("teacher", "epsilon", "v_prediction")
DISCRIMINATORS = ("teacher", "fresh")


@dataclass(frozen=True)
class DistillConfig:
    """How to distil a sampler into fewer network calls.

    - `guidance`: the student takes the guidance weight as an input (one call per step instead of two);
      trained on w drawn from `guidance` (a range), it samples at `guidance_scale` with DDIM at `steps`.
    - `progressive`: rounds that halve the steps, from `teacher_steps` down to `steps` (a power-of-two
      fraction of it); each round trains `train_steps` steps; loss on x0 with max(SNR, 1) weighting.
      A student without a guidance input folds one weight (`guidance` must then be one value).
    - `adversarial`: a `steps`-step generator trained against a discriminator made of the frozen
      teacher's blocks (`discriminator="teacher"`) or a fresh small network (`"fresh"`, the ablation) with
      light heads, plus `regression_weight` times the MSE to the teacher's `teacher_steps`-step samples.

    `prediction` is what the student predicts: the teacher's kind, or "v_prediction" (well conditioned at
    the noisiest step, where a noise predictor's x0 is 1/sqrt(alpha) times its error).
    """

    method: str = "progressive"
    steps: int = 4
    teacher_steps: int = 16
    train_steps: int = 500
    batch: int = 32
    lr: float = 1e-4
    warmup: int = 0
    guidance: tuple[float, float] = (1.5, 1.5)
    guidance_scale: float = 1.5
    prediction: str = "v_prediction"
    prompt_dropout: float = 0.1
    adversarial_weight: float = 0.1
    regression_weight: float = 1.0
    discriminator: str = "teacher"
    discriminator_lr: float = 2e-4
    regression_pool: int = 512
    seed: int = 0

    def validate(self) -> DistillConfig:
        """Return self, or raise RecipeError naming the first invalid field."""
        if self.method not in METHODS:
            raise RecipeError(f"distill method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("steps", "teacher_steps", "train_steps", "batch", "regression_pool"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RecipeError(f"distill.{name} must be a positive integer, got {value!r}")
        if self.method == "progressive":
            ratio = self.teacher_steps / self.steps
            if self.teacher_steps <= self.steps or ratio != 2 ** round(math.log2(ratio)):
                raise RecipeError(f"progressive distillation halves the steps each round, so teacher_steps "
                                  f"({self.teacher_steps}) must be steps ({self.steps}) times 2, 4, 8, ...; "
                                  f"for {self.steps} steps try teacher_steps = {self.steps * 4}")
        for name in ("lr", "discriminator_lr"):
            if not getattr(self, name) > 0:
                raise RecipeError(f"distill.{name} must be positive, got {getattr(self, name)}")
        low, high = self.guidance if len(self.guidance) == 2 else (math.nan, math.nan)
        if not (0.0 <= low <= high <= GUIDANCE_LIMIT):
            raise RecipeError(f"distill.guidance must be a range [low, high] inside [0, {GUIDANCE_LIMIT:g}], "
                              f"got {list(self.guidance)}")
        if not 0.0 <= self.guidance_scale <= GUIDANCE_LIMIT:
            raise RecipeError(f"distill.guidance_scale must be inside [0, {GUIDANCE_LIMIT:g}], "
                              f"got {self.guidance_scale}")
        if self.prediction not in STUDENT_PREDICTIONS:
            raise RecipeError(f"distill.prediction must be one of {STUDENT_PREDICTIONS}, got {self.prediction!r}")
        if self.discriminator not in DISCRIMINATORS:
            raise RecipeError(f"distill.discriminator must be one of {DISCRIMINATORS}, got {self.discriminator!r}")
        if not 0.0 <= self.prompt_dropout < 1.0 or self.warmup < 0:
            raise RecipeError("distill.prompt_dropout must be in [0, 1) and distill.warmup non-negative")
        if min(self.adversarial_weight, self.regression_weight) < 0:
            raise RecipeError("distill.adversarial_weight and distill.regression_weight must be non-negative")
        return self

    @staticmethod
    def of(value: Any, check: bool = True) -> DistillConfig:
        """Return a DistillConfig from a dict (a TOML [distill] table) or a DistillConfig, validated unless
        `check` is False (a recipe validates it once per stage, each with its own method)."""
        if isinstance(value, DistillConfig):
            return value.validate() if check else value
        if not isinstance(value, dict):
            raise RecipeError(f"distill settings must be a table, got {type(value).__name__}")
        known = {f.name for f in fields(DistillConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise RecipeError(f"unknown distill field(s) {unknown}; known: {sorted(known)}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        try:
            config = DistillConfig(**data)
        except TypeError as exc:
            raise RecipeError(f"invalid distill settings: {exc}") from exc
        return config.validate() if check else config
