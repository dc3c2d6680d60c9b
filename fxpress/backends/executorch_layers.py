"""The layers an ExecuTorch export swaps in for fxpress's low-bit ones, written in the pattern XNNPACK delegates.

XNNPACK runs a quantized GEMM only with int8 activations, so each layer quantizes its input on the
fly (per token for linear, per tensor for conv) and dequantizes its int4/int8 per-channel weight:
`dequantize -> linear/conv`. The partitioner folds the pattern into one qd8-f32-qc4w/qc8w kernel
and stores the weight at 4 or 8 bits. Importing this file needs `executorch` (it registers the
`quantized_decomposed` ops).
"""

from __future__ import annotations

import executorch.exir  # noqa: F401 - registers torch.ops.quantized_decomposed
import torch
import torch.nn.functional as F
from torch import nn

_Q = torch.ops.quantized_decomposed
_INT8 = (-128, 127)


class _QuantizedWeight(nn.Module):
    """Signed integer codes (int8 storage, values in [qmin, qmax]) with one scale per output channel."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, qmin: int, qmax: int):
        super().__init__()
        self.qmin, self.qmax = int(qmin), int(qmax)
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.float32).contiguous())
        self.register_buffer("zero_point", torch.zeros(codes.shape[0], dtype=torch.int64))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    def weight(self) -> torch.Tensor:
        """The float weight, as a dequantize node the partitioner recognises."""
        return _Q.dequantize_per_channel(self.codes, self.scale, self.zero_point, 0, self.qmin, self.qmax,
                                         torch.int8)


class XnnpackLinear(_QuantizedWeight):
    """Linear with int4/int8 per-channel weights and per-token dynamically quantized int8 input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = _Q.choose_qparams_per_token_asymmetric(x, torch.int8)
        q = _Q.quantize_per_token(x, scale, zero, *_INT8, torch.int8)
        x = _Q.dequantize_per_token(q, scale, zero, *_INT8, torch.int8, x.dtype)
        return F.linear(x, self.weight(), self.bias)


class XnnpackConv2d(_QuantizedWeight):
    """Conv2d with int8 per-channel weights and per-tensor dynamically quantized int8 input."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, qmin: int, qmax: int,
                 stride: list[int], padding: list[int], dilation: list[int]):
        super().__init__(codes, scale, bias, qmin, qmax)
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # XNNPACK's channels-last pass follows a dynamically quantized conv input up through first
        # arguments to its source and re-lays that out; a one-tensor cat (first argument: a list)
        # stops the walk here instead of at some unrelated rank-3 tensor far upstream.
        x = torch.cat([x], dim=1)
        scale, zero = _Q.choose_qparams.tensor(x, *_INT8, torch.finfo(torch.float32).eps, torch.int8)
        q = _Q.quantize_per_tensor.tensor(x, scale, zero, *_INT8, torch.int8)
        x = _Q.dequantize_per_tensor.tensor(q, scale, zero, *_INT8, torch.int8)
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)
