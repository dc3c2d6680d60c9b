"""`FactorClassifier`: a small CNN with one head per known factor, the testbed's quality judge.

Its penultimate activations are the features of the Fréchet distance. It flattens (rather than
pools) its last feature map, so it can tell positions apart. Angle factors (a nuisance such as a
shape's rotation) get a regression head predicting (cos, sin) of the angle scaled to its period, so
a probe can read them from generated images.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FactorClassifier(nn.Module):
    """Predict every factor of an image; `features` returns the shared embedding, `angles` the angle factors."""

    def __init__(self, channels: int, resolution: int, factors: dict[str, int], width: int = 32,
                 feature_dim: int = 64, angles: dict[str, float] | None = None):
        super().__init__()
        self.factor_names = list(factors)
        self.periods = dict(angles or {})
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Dropout(0.2),
            nn.Linear(2 * width * (resolution // 4) ** 2, feature_dim), nn.SiLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, k) for name, k in factors.items()})
        if self.periods:
            self.angle_heads = nn.ModuleDict({name: nn.Linear(feature_dim, 2) for name in self.periods})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Return the (N, feature_dim) embedding of images in [-1, 1]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}

    def angle_vectors(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return each angle factor's predicted (cos, sin) of 2π·angle/period, (N, 2), from `features`."""
        return {name: head(features) for name, head in getattr(self, "angle_heads", {}).items()}

    def angles(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return each angle factor's prediction in degrees, in [0, period)."""
        vectors = self.angle_vectors(self.features(images))
        return {name: vector_to_angle(v, self.periods[name]) for name, v in vectors.items()}


def angle_to_vector(degrees: torch.Tensor, period: float) -> torch.Tensor:
    """Return (N, 2) = (cos, sin) of 2π·degrees/period: the regression target of an angle head."""
    phase = degrees.float() * (2 * math.pi / period)
    return torch.stack([phase.cos(), phase.sin()], 1)


def vector_to_angle(vectors: torch.Tensor, period: float) -> torch.Tensor:
    """Return the angle in [0, period) degrees that (cos, sin) rows encode."""
    phase = torch.atan2(vectors[:, 1], vectors[:, 0])
    return torch.remainder(phase * (period / (2 * math.pi)), period)


def angle_error(predicted: torch.Tensor, true: torch.Tensor, period: float) -> torch.Tensor:
    """Return the absolute circular difference in degrees (at most period / 2)."""
    diff = torch.remainder(predicted.float() - true.float(), period)
    return torch.minimum(diff, period - diff)
