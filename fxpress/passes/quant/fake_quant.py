"""Fake quantization for training: `FakeQuantLinear` / `FakeQuantConv2d` with LSQ-style learnable scales.

Forward: w_q = s · clip(round(w / s), qmin, qmax). Rounding passes gradients straight through (STE),
and the scale learns from the same gradient as in LSQ (arXiv 1902.08153). The scale is kept as its
logarithm, so an optimizer step changes it by a fraction of itself: with Adam, a plain scale of 5e-4
and a step of 1e-3 would turn negative.
The scale used in forward is rounded to its stored dtype (fp16 by default, with STE), so `freeze`
produces exactly the codes and scales the forward pass used: the artifact computes what the
fake-quant model computed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fxpress.ir.annotations import QuantSpec


def _straight_through(value: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """Return exactly `rounded` in forward, with the gradient of `value` (value - value.detach() is 0)."""
    return rounded.detach() + (value - value.detach())


def _scaled_gradient(value: torch.Tensor, factor: float) -> torch.Tensor:
    """Return exactly `value` in forward, with its gradient multiplied by `factor`."""
    scaled = value * factor
    return value.detach() + (scaled - scaled.detach())


class _FakeQuant:
    """Mixin: the quantizer state shared by the linear and conv variants."""

    spec: QuantSpec
    weight: nn.Parameter
    log_scale: nn.Parameter

    @torch.no_grad()
    def _adopt(self, source: nn.Module, spec: QuantSpec, scale: torch.Tensor) -> None:
        """Take `source`'s weight and bias, and start the quantizer at `scale`."""
        self.weight.copy_(source.weight)
        if source.bias is not None:
            self.bias.copy_(source.bias)
        self.spec = spec
        self.scale_dtype = getattr(torch, spec.scale_dtype)
        smallest = float(torch.finfo(self.scale_dtype).smallest_normal)
        self.log_scale = nn.Parameter(scale.detach().float().clamp_min(smallest).log())
        per_channel = self.weight[0].numel()
        self.grad_factor = 1.0 / math.sqrt(per_channel * max(spec.qmax, 1))

    def effective_scale(self) -> torch.Tensor:
        """Return the scale forward uses: exp(log_scale) rounded to the stored dtype (gradients pass through)."""
        s = _scaled_gradient(self.log_scale, self.grad_factor).exp()
        return _straight_through(s, self._stored(s).float())

    def _stored(self, scale: torch.Tensor) -> torch.Tensor:
        smallest = float(torch.finfo(self.scale_dtype).smallest_normal)
        return scale.clamp(smallest, float(torch.finfo(self.scale_dtype).max)).to(self.scale_dtype)

    def quantized_weight(self) -> torch.Tensor:
        """Return s · clip(round(w / s)) with straight-through rounding."""
        s = self.effective_scale().view(-1, *([1] * (self.weight.dim() - 1)))
        v = (self.weight / s).clamp(self.spec.qmin, self.spec.qmax)
        return _straight_through(v, v.round()) * s

    @torch.no_grad()
    def frozen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (int32 codes shaped (rows, cols), stored-dtype scales) that forward currently uses."""
        s = self._stored(self.log_scale.exp())
        w2d = self.weight.reshape(self.weight.shape[0], -1).float()
        codes = torch.round(w2d / s.float().unsqueeze(1)).clamp(self.spec.qmin, self.spec.qmax)
        return codes.to(torch.int32), s


class FakeQuantLinear(nn.Linear, _FakeQuant):
    """nn.Linear whose forward uses its fake-quantized weight."""

    def __init__(self, source: nn.Linear, spec: QuantSpec, scale: torch.Tensor):
        super().__init__(source.in_features, source.out_features, source.bias is not None,
                         device=source.weight.device, dtype=torch.float32)
        self._adopt(source, spec, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class FakeQuantConv2d(nn.Conv2d, _FakeQuant):
    """nn.Conv2d (zero padding) whose forward uses its fake-quantized weight."""

    def __init__(self, source: nn.Conv2d, spec: QuantSpec, scale: torch.Tensor):
        super().__init__(source.in_channels, source.out_channels, source.kernel_size, source.stride,
                         source.padding, source.dilation, source.groups, source.bias is not None,
                         device=source.weight.device, dtype=torch.float32)
        self._adopt(source, spec, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


def fake_quant_module(module: nn.Module, spec: QuantSpec, scale: torch.Tensor) -> nn.Module:
    """Return the fake-quant twin of a Linear or Conv2d, initialised with `scale` (per output channel)."""
    if isinstance(module, nn.Linear):
        return FakeQuantLinear(module, spec, scale)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise TypeError(f"padding mode {module.padding_mode!r} is not supported")
        return FakeQuantConv2d(module, spec, scale)
    raise TypeError(f"cannot fake-quantize {type(module).__name__}")


def lsq_scales(weight2d: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Return LSQ's initial scales per row: 2 · mean|w| / sqrt(qmax)."""
    scale = 2 * weight2d.abs().mean(dim=1) / math.sqrt(max(spec.qmax, 1))
    return torch.where(scale > 0, scale, torch.ones_like(scale)).float()
