"""`ImageSet`: images in [-1, 1], their known factors (class labels) and captions rendered from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSet:
    """Images (N, C, H, W) in [-1, 1], integer factors {name: (N,)} and one caption per image."""

    images: torch.Tensor
    factors: dict[str, torch.Tensor]
    captions: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> ImageSet:
        """Return the images at `index`."""
        return ImageSet(self.images[index], {k: v[index] for k, v in self.factors.items()},
                        [self.captions[int(i)] for i in index])
