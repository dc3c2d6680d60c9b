"""The identity-adapter task on the shapes testbed (Shortcut-Rerouted adapter training, PAPERS.md §3).

Identity is a shape's kind and colour, taken from a reference image. The confounders an adapter may
wrongly learn to copy are the pose (position and rotation, which `pose_maps` draws as a map for a
control branch) and the lighting of its fine-tuning set (`lit`: a spotlight that pales the shape, or a
haze that lifts every pixel; `whiteness` reads the spotlight back whatever the shape's colour).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxpress.testbed import shapes
from fxpress.testbed.dataset import ImageSet

HAZE = 0.25  # x * (1 - HAZE) + HAZE keeps [-1, 1] in range; at 0.25 the dark background -0.84 becomes -0.38
SPOTLIGHT = 0.3  # a lit shape's smallest channel goes from about -0.76 to -0.24
LIGHTINGS = ("haze", "spotlight")  # the whole image lifted towards white, or only the shape
SHAPE_CONTRAST = 1.3  # every palette colour's largest channel lies >= 1.3 above the background ([-1, 1] units)
BACKGROUND = 0.08 * 2 - 1
ARM, HALF_WIDTH = 6.0, 0.75  # the pose marker: a thin "+" whose arms are ARM pixels long


def lit(images: torch.Tensor, strength: float = HAZE, lighting: str = "haze") -> torch.Tensor:
    """Return `images` under the fine-tuning set's lighting, `strength` in [0, 1] of the way to white:
    'haze' lifts every pixel (brighter, lower contrast), 'spotlight' only the shape's (its anti-aliased
    coverage), so the background stays as it was and the shape turns paler."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"lighting strength must lie in [0, 1], got {strength}")
    if lighting not in LIGHTINGS:
        raise ValueError(f"unknown lighting {lighting!r}; known: {', '.join(LIGHTINGS)}")
    lift = strength * (1.0 - images)
    if lighting == "spotlight":
        lift = lift * coverage(images)
    return images + lift


def coverage(images: torch.Tensor) -> torch.Tensor:
    """Return (N, 1, H, W) in [0, 1]: how much of each pixel the shape covers (1 inside, fractional on
    anti-aliased edges, 0 on the background)."""
    return ((images - BACKGROUND).abs().amax(1, keepdim=True) / SHAPE_CONTRAST).clamp(0, 1)


def whiteness(images: torch.Tensor) -> torch.Tensor:
    """Return each image's mean smallest channel over the pixels its shape fully covers (N,): every palette
    colour has one channel near 0 (-0.8 in [-1, 1] units), so this rises as the shape is lit paler,
    whatever its colour; images with no shape give 0."""
    weight = (coverage(images)[:, 0] >= 0.9).float()
    low = images.amin(1)
    return (low * weight).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1.0)


def centres(images: torch.Tensor) -> torch.Tensor:
    """Return each shape's centre (N, 2) as (x, y) pixels: the centroid of the pixels that differ from the
    background (every testbed shape is symmetric about its centre, the triangle about its incentre)."""
    weight = (images - BACKGROUND).abs().sum(1)  # (N, H, W), zero on the background
    n, h, w = weight.shape
    total = weight.sum((1, 2)).clamp_min(1e-6)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5).view(1, h, 1)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5).view(1, 1, w)
    return torch.stack([(weight * xs).sum((1, 2)) / total, (weight * ys).sum((1, 2)) / total], 1)


def pose_maps(images: ImageSet, supersample: int = 4, chunk: int = 512) -> torch.Tensor:
    """Return (N, 1, H, W) maps in [-1, 1] holding only the pose of each (unlit) image: a thin "+" at the
    shape's centre turned by its rotation; shape, colour and size are not drawn."""
    return torch.cat([_plus(images.images[lo:lo + chunk], images.factors["rotation"][lo:lo + chunk], supersample)
                      for lo in range(0, len(images), chunk)])


def _plus(images: torch.Tensor, rotation: torch.Tensor, supersample: int) -> torch.Tensor:
    n, _, h, _ = images.shape
    centre = centres(images)
    theta = rotation.float() * (math.pi / 180)
    coords = (torch.arange(h * supersample, dtype=torch.float32) + 0.5) / supersample
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx = xx[None] - centre[:, 0].view(n, 1, 1)
    dy = yy[None] - centre[:, 1].view(n, 1, 1)
    cos, sin = theta.cos().view(n, 1, 1), theta.sin().view(n, 1, 1)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    plus = ((u.abs() <= HALF_WIDTH) & (v.abs() <= ARM)) | ((v.abs() <= HALF_WIDTH) & (u.abs() <= ARM))
    return F.avg_pool2d(plus.float()[:, None], supersample) * 2 - 1


def request_prompt(size: int, position: int) -> str:
    """The prompt of an adapter probe: it asks for a size and a position and leaves the identity to the reference."""
    return shapes.describe({"size": size, "position": position})


def training_prompt(size: int) -> str:
    """The prompt an adapter trains with: the size only, so the reference must supply identity and pose."""
    return shapes.describe({"size": size})
