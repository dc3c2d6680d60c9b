"""Differentiable rewards of generated images, for reward fine-tuning (TextCraftor, PAPERS.md §4).

A reward scores images (N, C, H, W) in [-1, 1], given what the prompts asked for, with (N,) values
(higher is better) that are differentiable in the images. Each also has `evaluate`: a held-out measure
of the same quality that is not the reward itself (a second classifier, or a hard, non-differentiable
statistic), so reward hacking shows up as a reward that rises while its evaluator does not.

`AlignmentReward` is the CLIP-score analogue: the log-probability, under a classifier, of the factors the
prompt names. The style rewards ask for something no prompt names and come in opposite pairs:
`Brightness` (bright / dark), `Saturation` (vivid / muted, colour images), `Warmth` (warm / cool, colour
images: a palette where the prompt leaves the colour unsaid), `InkCoverage` (thick / thin
strokes) and `AngleReward` (an angle no prompt names, such as a shape's rotation: upright / tilted, read by
a classifier's angle head). `WeightedRewards` makes the loss −Σ wᵢ·mean(rᵢ); a reward given a floor is a
constraint instead: its term is −wᵢ·min(mean(rᵢ) − floorᵢ, 0), so it pulls only while the batch's mean is
below the floor (a hinge; TextCraftor's alignment "constraint" as a weighted objective keeps pulling where it
is far from saturated, and takes the updates the style needs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from fxpress.errors import FxpressError
from fxpress.training.distributed import global_mean

Targets = Mapping[str, torch.Tensor]  # factor name -> (N,) requested class, -1 where the prompt does not say


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4:
        raise FxpressError(f"rewards take images (batch, channels, height, width), got {tuple(images.shape)}")
    return (images + 1) / 2


def background(images: torch.Tensor) -> torch.Tensor:
    """Return each image's background colour (N, C, 1, 1): the median of its border pixels (no gradient)."""
    x = images.detach()
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    return border.median(dim=2).values[:, :, None, None]


def foreground_mask(images: torch.Tensor, threshold: float = 0.15) -> torch.Tensor:
    """Return a hard (N, H, W) mask of the pixels that differ from the image's background by more than
    `threshold` (mean absolute difference over channels, images in [-1, 1])."""
    return (images.detach() - background(images)).abs().mean(1) > threshold


class Reward(nn.Module):
    """A differentiable score of images given the prompts' targets, with a held-out `evaluate`."""

    name = "reward"
    image_kind = "any"  # which images it scores: "any", "colour" (3 channels) or "grey" (strokes on a dark ground)

    def forward(self, images: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
        """Return (N,) rewards, differentiable in `images`."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
        """Return (N,) values of the held-out measure of the same quality."""
        raise NotImplementedError


class AlignmentReward(Reward):
    """Mean log-probability, under `classifier`, of the factor values the prompt names (rows naming no
    factor score 0); evaluated by `judge`, a second classifier, as the share of named factors it reads
    back. Both return {factor: logits} like the testbeds' `FactorClassifier`."""

    name = "alignment"

    def __init__(self, classifier: nn.Module, judge: nn.Module):
        super().__init__()
        if judge is classifier:
            raise FxpressError("the alignment reward's judge must be a second classifier, not the reward's own")
        self.classifier = classifier.eval().requires_grad_(False)
        self.judge = judge.eval().requires_grad_(False)

    def _per_factor_mean(self, targets: Targets | None, logits: Mapping[str, torch.Tensor], score) -> tuple:
        """Return (mean over each row's named factors of score(logits, target), how many it names)."""
        if not targets:
            raise FxpressError("the alignment reward needs the prompts' targets ({factor: (N,) class or -1})")
        unknown = sorted(set(targets) - set(logits))
        if unknown:
            raise FxpressError(f"alignment reward: the classifier has no head for {unknown}; it reads "
                               f"{sorted(logits)}")
        total = count = 0
        for factor, target in targets.items():
            given = target.long() >= 0
            value = score(logits[factor], target.long().clamp_min(0))
            total = total + torch.where(given, value, torch.zeros_like(value))
            count = count + given.to(value.dtype)
        return total / count.clamp_min(1), count

    def forward(self, images: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
        def log_probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return logits.log_softmax(-1).gather(1, target.view(-1, 1)).squeeze(1)

        return self._per_factor_mean(targets, self.classifier(images), log_probability)[0]

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
        def hit(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return (logits.argmax(-1) == target).to(logits.dtype)

        share, count = self._per_factor_mean(targets, self.judge(images), hit)
        return torch.where(count > 0, share, torch.ones_like(share))


class Brightness(Reward):
    """`direction` (+1 brighter, −1 darker) times the mean pixel value of the whole image, in [0, 1];
    evaluated as the median HSV value (max over channels) of the foreground pixels only, so brightening
    the background alone raises the reward but not the evaluator."""

    def __init__(self, direction: float = 1.0):
        super().__init__()
        self.direction = float(direction)
        self.name = "bright" if direction > 0 else "dark"

    def forward(self, images: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
        return self.direction * _to_unit(images).mean((1, 2, 3))

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
        value = _to_unit(images).amax(1)
        return _masked_median(value, foreground_mask(images))


class ColourReward(Reward):
    """A reward on colour images: `direction` times the mean of `quantity` (per pixel, of the images in
    [0, 1]) over the soft foreground, the pixels that differ from the background, weighted by a sigmoid of
    sharpness `sharpness` (no gradient through the weights). `names`: the names for +1 and −1."""

    image_kind = "colour"
    names = ("colour", "colour")

    def __init__(self, direction: float = 1.0, sharpness: float = 20.0):
        super().__init__()
        self.direction, self.sharpness = float(direction), float(sharpness)
        self.name = self.names[0] if direction > 0 else self.names[1]

    def quantity(self, unit: torch.Tensor) -> torch.Tensor:
        """Return the (N, H, W) per-pixel value of images (N, C, H, W) in [0, 1] that the reward averages."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
        _need_colour(images, self.name)
        weight = torch.sigmoid(self.sharpness * ((images - background(images)).abs().mean(1) - 0.15)).detach()
        value = self.quantity(_to_unit(images))
        return self.direction * (value * weight).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1.0)


class Saturation(ColourReward):
    """`direction` (+1 vivid, −1 muted) times the foreground-weighted mean chroma (max − min over the
    colour channels, in [0, 1]); evaluated as the median HSV saturation (max − min) / max of the hard
    foreground."""

    names = ("vivid", "muted")

    def quantity(self, unit: torch.Tensor) -> torch.Tensor:
        return unit.amax(1) - unit.amin(1)

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
        _need_colour(images, self.name)
        unit = _to_unit(images)
        high, low = unit.amax(1), unit.amin(1)
        return _masked_median((high - low) / high.clamp_min(1e-3), foreground_mask(images))


class Warmth(ColourReward):
    """`direction` (+1 warm, −1 cool) times the foreground-weighted mean of red minus blue (in [−1, 1]);
    evaluated as the median over the hard foreground's coloured pixels (chroma > 0.1; 0 where there are none)
    of cos(hue − 30°), the HSV hue's closeness to orange (red and yellow near +0.9, cyan and blue near −0.9).
    On a prompt that leaves the colour unsaid it asks for a palette; on one that names it, for a colour the
    prompt did not ask for."""

    names = ("warm", "cool")

    def quantity(self, unit: torch.Tensor) -> torch.Tensor:
        return unit[:, 0] - unit[:, 2]

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
        _need_colour(images, self.name)
        unit = _to_unit(images)[:, :3]
        coloured = foreground_mask(images) & (unit.amax(1) - unit.amin(1) > 0.1)  # grey has no hue
        return _masked_median(torch.cos(_hue(unit) - np.pi / 6), coloured)


def _hue(rgb: torch.Tensor) -> torch.Tensor:
    """HSV hue in radians (N, H, W) of images (N, 3, H, W) in [0, 1]; 0 where a pixel is grey."""
    r, g, b = rgb.unbind(1)
    high, low = rgb.amax(1), rgb.amin(1)
    span = (high - low).clamp_min(1e-6)
    sector = torch.where(high == r, ((g - b) / span) % 6,
                         torch.where(high == g, (b - r) / span + 2, (r - g) / span + 4))
    return torch.where(high - low > 1e-6, sector * (np.pi / 3), torch.zeros_like(sector))


class InkCoverage(Reward):
    """`direction` (+1 thicker, −1 thinner strokes) times the soft share of pixels brighter than the middle
    grey (a sigmoid of sharpness `sharpness`); evaluated as the mean stroke width in pixels of the hard ink
    mask, 4·d − 2 with d the mean distance of ink pixels to the nearest background pixel (across a stroke
    w pixels wide the distances run 1, 2, …, w/2 and back, so d ≈ (w + 2) / 4)."""

    image_kind = "grey"

    def __init__(self, direction: float = 1.0, sharpness: float = 10.0):
        super().__init__()
        self.direction, self.sharpness = float(direction), float(sharpness)
        self.name = "thick" if direction > 0 else "thin"

    def forward(self, images: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
        luminance = _to_unit(images).mean(1) * 2 - 1
        return self.direction * torch.sigmoid(self.sharpness * luminance).mean((1, 2))

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
        from scipy.ndimage import distance_transform_edt

        ink = (images.detach().mean(1) > 0).cpu().numpy()
        widths = []
        for mask in ink:
            if not mask.any():
                widths.append(0.0)
                continue
            distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
            widths.append(float(4 * distance[mask].mean() - 2))
        return torch.tensor(widths, dtype=images.dtype)


class AngleReward(Reward):
    """How close an angle factor the prompts never name (a shape's rotation) is to `target` degrees:
    cos(2π·(angle − target)/period) with the angle read by `classifier`'s angle head (its (cos, sin)
    vector, normalised), evaluated the same way by `judge`, a second classifier, on its hard angle.
    Rows `defined(targets)` marks False (a circle has no rotation) score 0."""

    def __init__(self, name: str, classifier: nn.Module, judge: nn.Module, factor: str, period: float,
                 target: float, defined: Callable[[Targets], torch.Tensor] | None = None):
        super().__init__()
        if judge is classifier:
            raise FxpressError(f"the {name!r} reward's judge must be a second classifier, not the reward's own")
        for role, model in (("classifier", classifier), ("judge", judge)):
            if factor not in getattr(model, "periods", {}):
                raise FxpressError(f"the {name!r} reward reads angle {factor!r}, which the {role} has no head for")
        self.name, self.factor, self.period, self.target = name, factor, float(period), float(target)
        self.classifier = classifier.eval().requires_grad_(False)
        self.judge = judge.eval().requires_grad_(False)
        self.defined = defined

    def _direction(self, like: torch.Tensor) -> torch.Tensor:
        phase = torch.tensor(2 * np.pi * self.target / self.period, dtype=like.dtype, device=like.device)
        return torch.stack([phase.cos(), phase.sin()])

    def _mask(self, targets: Targets | None, n: int, like: torch.Tensor) -> torch.Tensor:
        if self.defined is None:
            return torch.ones(n, dtype=torch.bool, device=like.device)
        if not targets:
            raise FxpressError(f"the {self.name!r} reward needs the prompts' targets to know where "
                               f"{self.factor!r} is defined")
        return self.defined(targets).to(like.device)

    def forward(self, images: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
        vector = self.classifier.angle_vectors(self.classifier.features(images))[self.factor]
        score = (vector @ self._direction(vector)) / vector.norm(dim=1).clamp_min(1e-6)
        return torch.where(self._mask(targets, len(images), score), score, torch.zeros_like(score))

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
        angle = self.judge.angles(images)[self.factor]
        score = torch.cos((angle - self.target) * (2 * np.pi / self.period))
        return torch.where(self._mask(targets, len(images), score), score, torch.zeros_like(score))


def _need_colour(images: torch.Tensor, name: str) -> None:
    if images.dim() != 4 or images.shape[1] < 3:
        raise FxpressError(f"the {name!r} reward needs colour images (3 channels), got {tuple(images.shape)}")


def _masked_median(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Median of `values` (N, H, W) over each image's mask; 0 where the mask is empty."""
    out = []
    for v, m in zip(values, mask):
        out.append(v[m].median() if m.any() else v.new_zeros(()))
    return torch.stack(out)


STYLE_REWARDS = {"bright": (Brightness, 1.0), "dark": (Brightness, -1.0), "vivid": (Saturation, 1.0),
                 "muted": (Saturation, -1.0), "warm": (Warmth, 1.0), "cool": (Warmth, -1.0),
                 "thick": (InkCoverage, 1.0), "thin": (InkCoverage, -1.0)}


def style_reward(name: str) -> Reward:
    """Return the style reward called `name` (one of STYLE_REWARDS)."""
    if name not in STYLE_REWARDS:
        raise FxpressError(f"unknown style reward {name!r}; known: {', '.join(STYLE_REWARDS)} (and 'alignment')")
    kind, direction = STYLE_REWARDS[name]
    return kind(direction)


class WeightedRewards(nn.Module):
    """Several rewards with weights: `loss` is −Σ wᵢ·mean(rᵢ), where a reward with a floor (`floors`,
    {name: value}) counts only below it: −wᵢ·min(mean(rᵢ) − floorᵢ, 0). `scores` and `evaluate` report each
    one."""

    def __init__(self, rewards: Mapping[str, tuple[Reward, float]], floors: Mapping[str, float] | None = None):
        super().__init__()
        if not rewards:
            raise FxpressError("reward fine-tuning needs at least one reward (name=weight)")
        for name, (_, weight) in rewards.items():
            if not np.isfinite(weight):
                raise FxpressError(f"reward {name!r}: the weight must be a finite number, got {weight}")
        self.rewards = nn.ModuleDict({name: reward for name, (reward, _) in rewards.items()})
        self.weights = {name: float(weight) for name, (_, weight) in rewards.items()}
        self.floors = self._checked_floors(floors or {})

    def _checked_floors(self, floors: Mapping[str, float]) -> dict[str, float]:
        unknown = sorted(set(floors) - set(self.weights))
        if unknown:
            raise FxpressError(f"a floor is given for {unknown}, which is not among the rewards "
                               f"{sorted(self.weights)}")
        for name, value in floors.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise FxpressError(f"reward {name!r}: the floor must be a finite number, got {value!r}")
        return {name: float(value) for name, value in floors.items()}

    def with_floors(self, floors: Mapping[str, float]) -> WeightedRewards:
        """Return the same rewards and weights with `floors` ({name: value}) added to this one's."""
        weighted = {name: (reward, self.weights[name]) for name, reward in self.rewards.items()}
        return WeightedRewards(weighted, {**self.floors, **floors})

    def scores(self, images: torch.Tensor, targets: Targets | None = None) -> dict[str, torch.Tensor]:
        """Return each reward's (N,) values."""
        return {name: reward(images, targets) for name, reward in self.rewards.items()}

    def loss(self, images: torch.Tensor, targets: Targets | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (−Σ wᵢ·term(rᵢ), each reward's batch mean); term is mean(rᵢ), or min(mean(rᵢ) − floorᵢ, 0)
        for a floored reward. Under torchrun the floors compare with the mean over every process's images,
        so the update is the one a single process with the whole batch makes."""
        scores = self.scores(images, targets)
        means = {name: value.mean() for name, value in scores.items()}
        total = 0.0
        for name, mean in means.items():
            term = mean
            if name in self.floors:
                below = global_mean(mean.detach()) < self.floors[name]
                term = (mean - self.floors[name]) * float(below)
            total = total - self.weights[name] * term
        return total, {name: float(mean.detach()) for name, mean in means.items()}

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, targets: Targets | None = None) -> dict[str, torch.Tensor]:
        """Return each reward's held-out evaluator values (N,)."""
        return {name: reward.evaluate(images, targets) for name, reward in self.rewards.items()}
