"""`FactorClassifier`: a small CNN with one head per known factor, the testbed's quality judge.

Its penultimate activations are the features of the Fréchet distance. It flattens (rather than
pools) its last feature map, so it can tell positions apart.
"""

from __future__ import annotations

import torch
from torch import nn


class FactorClassifier(nn.Module):
    """Predict every factor of an image; `features` returns the shared embedding."""

    def __init__(self, channels: int, resolution: int, factors: dict[str, int], width: int = 32,
                 feature_dim: int = 64):
        super().__init__()
        self.factor_names = list(factors)
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Dropout(0.2),
            nn.Linear(2 * width * (resolution // 4) ** 2, feature_dim), nn.SiLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, k) for name, k in factors.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Return the (N, feature_dim) embedding of images in [-1, 1]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}
