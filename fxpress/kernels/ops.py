"""Low-bit custom ops (`fxpress::lowbit_linear`, `fxpress::lowbit_conv2d`) with CPU implementations.

Weights arrive as row-aligned packed codes (see packing.pack_aligned) plus per-output-channel
scales; the CPU path dequantizes and calls the dense op. Other backends register their own kernels
for the same ops, so a model holding these ops runs unchanged everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxpress.kernels.packing import unpack_aligned

__all__ = ["dequantize", "lowbit_conv2d", "lowbit_linear", "unpack_aligned"]


def dequantize(packed: torch.Tensor, scale: torch.Tensor, width: int, offset: int, cols: int) -> torch.Tensor:
    """Return the float32 weight (rows, cols) = (code - offset) * scale[row]."""
    codes = unpack_aligned(packed, width, cols) - offset
    return codes.to(torch.float32) * scale.to(torch.float32).unsqueeze(1)


@torch.library.custom_op("fxpress::lowbit_linear", mutates_args=())
def lowbit_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  width: int, offset: int, in_features: int) -> torch.Tensor:
    """y = x @ dequant(W).T + bias, with W stored as packed codes."""
    weight = dequantize(packed, scale, width, offset, in_features).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


@lowbit_linear.register_fake
def _lowbit_linear_fake(x, packed, scale, bias, width, offset, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("fxpress::lowbit_conv2d", mutates_args=())
def lowbit_conv2d(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  width: int, offset: int, weight_shape: list[int], stride: list[int], padding: list[int],
                  dilation: list[int], groups: int) -> torch.Tensor:
    """conv2d(x, dequant(W)) + bias, with W stored as packed codes of its (out, in*kh*kw) matrix."""
    cols = weight_shape[1] * weight_shape[2] * weight_shape[3]
    weight = dequantize(packed, scale, width, offset, cols).reshape(weight_shape).to(x.dtype)
    return F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)


@lowbit_conv2d.register_fake
def _lowbit_conv2d_fake(x, packed, scale, bias, width, offset, weight_shape, stride, padding, dilation, groups):
    h, w = x.shape[-2:]
    kh, kw = weight_shape[2], weight_shape[3]
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((*x.shape[:-3], weight_shape[0], out_h, out_w))
