"""The 8x8 handwritten digits scikit-learn ships (1,797 images, no download), upsampled to 16x16.

Images are single-channel floats in [-1, 1]. The split is fixed: a seeded permutation puts 1,497
images in `train` and 300 in `test` (held out for the Fréchet distance and denoising MSE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxpress.testbed.dataset import ImageSet

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZE = 16
HELD_OUT = 300


def caption(label: int) -> str:
    """Return the caption of digit `label`, e.g. 'a handwritten seven'."""
    return f"a handwritten {WORDS[label]}"


def load_digits_split(split: str, size: int = SIZE) -> ImageSet:
    """Return the 'train' or 'test' split as an ImageSet of (N, 1, size, size) images and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images).float().unsqueeze(1) / 8.0 - 1.0  # 0..16 -> -1..1
    labels = torch.from_numpy(data.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    index = order[HELD_OUT:] if split == "train" else order[:HELD_OUT]
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images = F.interpolate(images[index], size=(size, size), mode="bilinear", align_corners=False)
    factors = {"digit": labels[index]}
    return ImageSet(images.clamp(-1, 1), factors, [caption(int(y)) for y in labels[index]])
