"""`QATConfig`: the settings of BitsFusion's two-stage quantization-aware training, validated."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fxpress.errors import RecipeError


@dataclass(frozen=True)
class QATConfig:
    """Two-stage QAT (BitsFusion; PAPERS.md §1 steps 7–8).

    Stage I distils from the frozen full-precision teacher: with `cfg_distill`, the student's guided
    noise prediction eps(x,∅) + w·(eps(x,c) − eps(x,∅)) must match the teacher's (w drawn from
    `guidance`, the prompt dropped with probability `prompt_dropout`); otherwise the plain conditional
    outputs are matched. `feature_distill` adds the MSE between block outputs. Stage II is plain
    noise-prediction fine-tuning. Timesteps are uniform or Beta(`beta`) scaled to the schedule
    (`timesteps`). `scale_init` 'recipe' keeps the recipe's (ALS or min-max) scales; 'lsq' uses
    LSQ's 2·mean|w|/sqrt(qmax).
    """

    stage1_steps: int = 600
    stage2_steps: int = 200
    batch: int = 32
    lr: float = 1e-4
    scale_lr: float = 1e-3
    cfg_distill: bool = True
    guidance: tuple[float, float] = (1.0, 5.0)
    prompt_dropout: float = 0.1
    feature_distill: float = 1.0
    timesteps: str = "beta"
    beta: tuple[float, float] = (3.0, 1.0)
    stage2_timesteps: str = "uniform"
    scale_init: str = "recipe"
    seed: int = 0

    def validate(self) -> QATConfig:
        """Return self, or raise RecipeError naming the first invalid field."""
        if self.stage1_steps < 0 or self.stage2_steps < 0 or self.stage1_steps + self.stage2_steps == 0:
            raise RecipeError(f"QAT needs a positive number of steps, got stage1={self.stage1_steps}, "
                              f"stage2={self.stage2_steps}")
        if self.batch < 1 or self.lr <= 0 or self.scale_lr <= 0:
            raise RecipeError(f"QAT batch and learning rates must be positive (batch={self.batch}, lr={self.lr}, "
                              f"scale_lr={self.scale_lr})")
        for name in ("timesteps", "stage2_timesteps"):
            if getattr(self, name) not in ("uniform", "beta"):
                raise RecipeError(f"qat.{name} must be 'uniform' or 'beta', got {getattr(self, name)!r}")
        if len(self.beta) != 2 or min(self.beta) <= 0:
            raise RecipeError(f"qat.beta must be two positive numbers, got {list(self.beta)}")
        if len(self.guidance) != 2 or self.guidance[0] > self.guidance[1]:
            raise RecipeError(f"qat.guidance must be a range [low, high], got {list(self.guidance)}")
        if not 0 <= self.prompt_dropout < 1 or self.feature_distill < 0:
            raise RecipeError("qat.prompt_dropout must be in [0, 1) and qat.feature_distill non-negative")
        if self.scale_init not in ("recipe", "lsq"):
            raise RecipeError(f"qat.scale_init must be 'recipe' or 'lsq', got {self.scale_init!r}")
        return self

    @staticmethod
    def of(value: Any) -> QATConfig | None:
        """Return a validated QATConfig from None, a dict (e.g. a TOML [qat] table) or a QATConfig."""
        if value is None or isinstance(value, QATConfig):
            return value.validate() if value is not None else None
        if not isinstance(value, dict):
            raise RecipeError(f"qat must be a table of settings, got {type(value).__name__}")
        known = {f.name for f in fields(QATConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise RecipeError(f"unknown qat field(s) {unknown}; known: {sorted(known)}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        try:
            return QATConfig(**data).validate()
        except TypeError as exc:
            raise RecipeError(f"invalid qat settings: {exc}") from exc
