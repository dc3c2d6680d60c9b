"""`LoRA`: a low-rank branch beside a linear or conv layer (float or fxpress low-bit).

out = base(x) + scale · (alpha / rank) · B(A(dropout(x))), with A a rank-r projection (for a conv, a
k×k conv with the base's stride, padding and dilation) and B a rank-r → out projection (a 1×1 conv),
B zero-initialised so a new branch leaves the output bit-identical. `scale` is a buffer: changing it
changes an exported program's behaviour without capturing again, and at scale 0 the output equals
the base layer's exactly. The submodule names follow peft's (`base_layer`, `lora_A`, `lora_B`) so state
dicts translate key by key.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear

LINEAR_TYPES = (nn.Linear, LowBitLinear)
CONV_TYPES = (nn.Conv2d, LowBitConv2d)


def lora_geometry(base: nn.Module) -> tuple[str, int, int]:
    """Return (kind, input features, output features) of a layer LoRA can sit beside; ValueError otherwise."""
    if isinstance(base, LINEAR_TYPES):
        return "linear", base.in_features, base.out_features
    if isinstance(base, CONV_TYPES):
        if base.groups != 1:
            raise ValueError(f"a LoRA branch needs an ungrouped conv, this one has groups={base.groups}")
        if isinstance(base, nn.Conv2d) and (base.padding_mode != "zeros" or isinstance(base.padding, str)):
            raise ValueError(f"a LoRA branch needs a zero-padded conv with numeric padding, got {base.padding!r}")
        return "conv2d", base.in_channels, base.out_channels
    raise ValueError(f"LoRA sits beside Linear or Conv2d layers (float or low-bit), not {type(base).__name__}")


class LoRA(nn.Module):
    """A layer plus a trainable low-rank branch (see the module docstring)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 scale: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        kind, fan_in, fan_out = lora_geometry(base)
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.kind, self.rank = kind, int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.fused = False  # FuseLoRA: the branch is folded into base_layer's weight and not run
        self.base_layer = base
        dtype = torch.float32 if isinstance(base, (LowBitLinear, LowBitConv2d)) else base.weight.dtype
        if kind == "linear":
            self.lora_A = nn.Linear(fan_in, rank, bias=False, dtype=dtype)
            self.lora_B = nn.Linear(rank, fan_out, bias=False, dtype=dtype)
        else:
            self.lora_A = nn.Conv2d(fan_in, rank, tuple(base.kernel_size), tuple(base.stride), tuple(base.padding),
                                    tuple(base.dilation), bias=False, dtype=dtype)
            self.lora_B = nn.Conv2d(rank, fan_out, 1, bias=False, dtype=dtype)
        with torch.no_grad():  # A like a fresh layer (uniform, Kaiming bound), B zero
            bound = 1.0 / math.sqrt(self.lora_A.weight[0].numel())
            self.lora_A.weight.uniform_(-bound, bound, generator=generator)
            self.lora_B.weight.zero_()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))

    @property
    def factor(self) -> float:
        """alpha / rank, the constant peft calls `scaling`."""
        return self.alpha / self.rank

    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The weight change the branch adds at its current scale, shaped like the base weight, in `dtype`."""
        a = self.lora_A.weight.detach().to(dtype)
        b = self.lora_B.weight.detach().to(dtype).reshape(self.lora_B.weight.shape[0], self.rank)
        delta = b @ a.reshape(self.rank, -1)
        return (delta * (float(self.scale) * self.factor)).reshape(-1, *a.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.fused:
            return out
        branch = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return out + (branch * (self.scale * self.factor)).to(out.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, fused={self.fused}"
