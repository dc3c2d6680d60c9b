"""Procedural 32x32 "captioned shapes": every image is drawn from known factors, and so is its caption.

Factors: shape (circle, square, triangle, cross), colour (six), size (small, large), position (four
quadrants, with a little jitter) and rotation (0-90 degrees, a nuisance factor the caption does not
mention). Shapes are rendered at 4x resolution and box-filtered, so edges are anti-aliased.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxpress.testbed.dataset import ImageSet

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.1), "magenta": (0.85, 0.15, 0.8), "cyan": (0.1, 0.8, 0.85)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
FACTORS = {"shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES), "position": len(POSITIONS)}
ROTATION_PERIOD = 90.0  # squares and crosses repeat every 90 degrees; rotations are drawn in [0, 90)
SIZE = 32
_SUPER = 4
_RADIUS = {0: 4.5, 1: 7.5}


def caption(shape: int, colour: int, size: int, position: int) -> str:
    """Return the caption of one factor combination, e.g. 'a large red triangle at the top left'."""
    return describe({"shape": shape, "colour": colour, "size": size, "position": position})


def describe(factors: dict[str, int | None], position_first: bool = False) -> str:
    """Return a caption naming only the factors given (None or absent: left unsaid), e.g. 'a red shape'
    or 'a large shape at the top left' (`position_first`: 'at the top left a large shape')."""
    where = ["at", "the", POSITIONS[factors["position"]]] if factors.get("position") is not None else []
    words = ["a"]
    if factors.get("size") is not None:
        words.append(SIZES[factors["size"]])
    if factors.get("colour") is not None:
        words.append(list(COLOURS)[factors["colour"]])
    words.append(SHAPES[factors["shape"]] if factors.get("shape") is not None else "shape")
    return " ".join(where + words if position_first else words + where)


def angle_defined(name: str, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return which images angle factor `name` is defined for: a circle has no rotation."""
    if name != "rotation":
        raise KeyError(f"shapes has no angle factor {name!r}")
    return factors["shape"] != SHAPES.index("circle")


def _mask(shape: int, x: torch.Tensor, y: torch.Tensor, radius: float) -> torch.Tensor:
    if shape == 0:
        return x.square() + y.square() <= radius ** 2
    if shape == 1:
        return torch.maximum(x.abs(), y.abs()) <= radius * 0.82
    if shape == 2:
        inside = y <= radius * 0.5
        for angle in (math.pi / 6, 5 * math.pi / 6):  # the two upper edges of an equilateral triangle
            inside &= x * math.cos(angle) - y * math.sin(angle) <= radius * 0.5
        return inside
    arm = radius / 3
    return ((x.abs() <= arm) & (y.abs() <= radius)) | ((y.abs() <= arm) & (x.abs() <= radius))


def render(shape: int, colour: int, size: int, position: int, rotation: float, jitter: tuple[float, float],
           resolution: int = SIZE) -> torch.Tensor:
    """Return one image (3, resolution, resolution) in [-1, 1] for the given factors."""
    scale = resolution / SIZE
    n = resolution * _SUPER
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / _SUPER
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cx = (8.5 if position % 2 == 0 else 23.5) * scale + jitter[0]
    cy = (8.5 if position < 2 else 23.5) * scale + jitter[1]
    theta = math.radians(rotation)
    dx, dy = xx - cx, yy - cy
    x = dx * math.cos(theta) + dy * math.sin(theta)
    y = -dx * math.sin(theta) + dy * math.cos(theta)
    alpha = _mask(shape, x, y, _RADIUS[size] * scale).float()
    alpha = F.avg_pool2d(alpha[None, None], _SUPER)[0]
    rgb = torch.tensor(list(COLOURS.values())[colour]).view(3, 1, 1)
    background = torch.full((3, 1, 1), 0.08)
    return (background * (1 - alpha) + rgb * alpha) * 2 - 1


def make_shapes(count: int, seed: int) -> ImageSet:
    """Return `count` images with uniformly drawn factors (deterministic for a given seed)."""
    gen = torch.Generator().manual_seed(seed)
    factors = {name: torch.randint(0, k, (count,), generator=gen) for name, k in FACTORS.items()}
    rotation = torch.rand(count, generator=gen) * 90
    jitter = (torch.rand(count, 2, generator=gen) - 0.5) * 3
    images = torch.stack([
        render(int(factors["shape"][i]), int(factors["colour"][i]), int(factors["size"][i]),
               int(factors["position"][i]), float(rotation[i]), tuple(jitter[i].tolist()))
        for i in range(count)])
    captions = [caption(*(int(factors[k][i]) for k in FACTORS)) for i in range(count)]
    factors["rotation"] = rotation.round().long()
    return ImageSet(images, factors, captions)


def load_shapes_split(split: str, train_count: int = 12000, test_count: int = 1000) -> ImageSet:
    """Return the 'train' or 'test' split (different seeds, so the test images are never trained on)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return make_shapes(train_count, 1) if split == "train" else make_shapes(test_count, 2)
