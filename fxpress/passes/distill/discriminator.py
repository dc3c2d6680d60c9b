"""The discriminator of adversarial step distillation: a feature network and light conditioned heads.

LADD-style: the features come from the frozen teacher's blocks at several depths (its forward on a
re-noised image, recorded by `FeatureTap`); a fresh small convolutional network is the ablation. Each
feature map gets a head (1x1 projection, SiLU, mean over positions) whose logit is a linear read-out
plus a projection term conditioned on the noise level and the text (the mean text embedding).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from fxpress.errors import PassError
from fxpress.passes.distill.features import FeatureTap, block_modules


def timestep_features(t: torch.Tensor, width: int = 64, total: int = 1000) -> torch.Tensor:
    """Return sinusoidal features (B, width) of integer timesteps."""
    half = width // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float().view(-1, 1) * (1000.0 / total) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Head(nn.Module):
    """One feature map (B, C, H, W) or token sequence (B, N, C) -> one logit per row, conditioned."""

    def __init__(self, channels: int, condition_width: int, width: int = 64, tokens: bool = False):
        super().__init__()
        self.tokens = tokens
        self.project = nn.Linear(channels, width) if tokens else nn.Conv2d(channels, width, 1)
        self.act = nn.SiLU()
        self.read = nn.Linear(width, 1)
        self.condition = nn.Linear(condition_width, width)

    def forward(self, feature: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        h = self.act(self.project(feature))
        pooled = h.mean(1) if self.tokens else h.mean((2, 3))
        return self.read(pooled).squeeze(1) + (pooled * self.condition(condition)).sum(1) / pooled.shape[1] ** 0.5


class FreshBackbone(nn.Module):
    """A small trainable convolutional network (the ablation of the frozen teacher features): three stages
    of stride-2 convolutions, each stage's output one feature map."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.stages = nn.ModuleList()
        for i in range(3):
            c_in = channels if i == 0 else width * 2 ** (i - 1)
            self.stages.append(nn.Sequential(nn.Conv2d(c_in, width * 2 ** i, 3, stride=2 if i else 1, padding=1),
                                             nn.GroupNorm(8, width * 2 ** i), nn.SiLU()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            feats[f"stage{i}"] = x
        return feats


class Discriminator(nn.Module):
    """Logits of re-noised images: features from the frozen teacher (`teacher_forward` records its blocks) or
    from a `FreshBackbone`, one `Head` per feature, summed.

    `teacher_forward(x, t, cond)` must run the teacher; its block outputs are read from a FeatureTap.
    Trainable: the heads (and the fresh backbone). `logits(..., frozen=True)` uses detached copies of the
    trainable parameters, so a generator loss through it trains the generator only.
    """

    def __init__(self, teacher: nn.Module, teacher_forward: Callable, example: tuple[torch.Tensor, ...],
                 condition_width: int, kind: str = "teacher", width: int = 64):
        super().__init__()
        self.kind, self.width = kind, width
        self.teacher_forward = teacher_forward
        self.tap = FeatureTap(block_modules(teacher)) if kind == "teacher" else None
        self.backbone = FreshBackbone(example[0].shape[1]) if kind == "fresh" else None
        with torch.no_grad():
            feats = self._features(*example)
        if not feats:
            raise PassError("the teacher has no blocks whose outputs the discriminator could read (it looks for "
                            "ModuleLists such as down_blocks / transformer_blocks)", "AdversarialDistill")
        self.names = sorted(feats)
        self.heads = nn.ModuleDict({name.replace(".", "_"): Head(f.shape[-1] if f.dim() == 3 else f.shape[1],
                                                                  condition_width + width, width, f.dim() == 3)
                                    for name, f in feats.items()})

    def _features(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                  params: dict | None = None) -> dict[str, torch.Tensor]:
        if self.backbone is not None:
            return self.backbone(x) if params is None else functional_call(self.backbone, params, (x,))
        self.tap.values.clear()
        self.teacher_forward(x, t, cond)
        return {k: v for k, v in self.tap.values.items() if v.dim() in (3, 4)}

    def logits(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Return one logit per row of `x` (noised at `t`, conditioned on text embeddings `cond`)."""
        detached = {n: p.detach() for n, p in self.named_parameters()} if frozen else None
        backbone = None
        if detached is not None and self.backbone is not None:
            backbone = {n.removeprefix("backbone."): p for n, p in detached.items() if n.startswith("backbone.")}
        feats = self._features(x, t, cond, backbone)
        condition = torch.cat([cond.mean(1), timestep_features(t, self.width).to(cond.dtype)], dim=1)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for name in self.names:
            key = name.replace(".", "_")
            head = self.heads[key]
            if detached is None:
                total = total + head(feats[name], condition)
            else:
                own = {n.removeprefix(f"heads.{key}."): p for n, p in detached.items() if n.startswith(f"heads.{key}.")}
                total = total + functional_call(head, own, (feats[name], condition))
        return total / len(self.names)

    def close(self) -> None:
        """Remove the feature hooks from the teacher."""
        if self.tap is not None:
            self.tap.close()
