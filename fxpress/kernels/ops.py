"""Low-bit custom ops (`fxpress::lowbit_linear`, `fxpress::lowbit_conv2d`) and their torch reference.

Weights arrive as K-major int32 words of `width`-bit codes (see packing.pack_words) plus scales:
per output channel, shape (N,), or group-wise, shape (N, G) with groups of ceil(K / G) inputs.
Each op looks up an implementation by device type (`set_implementation`); the default is the torch
reference, which dequantizes and calls the dense op. A backend (Triton) swaps in its own kernels,
so a model holding these ops runs unchanged everywhere and still exports as the same two ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fxpress.kernels.packing import unpack_words

__all__ = ["conv2d_reference", "dequantize", "implementation", "linear_reference", "lowbit_conv2d",
           "lowbit_linear", "set_implementation", "unpack_words"]

_IMPLEMENTATIONS: dict[tuple[str, str], Callable[..., torch.Tensor]] = {}


def group_size(cols: int, scale: torch.Tensor) -> int:
    """Return how many consecutive inputs share one scale: all of them for per-channel scales."""
    return cols if scale.dim() == 1 else -(-cols // scale.shape[1])


def dequantize(packed: torch.Tensor, scale: torch.Tensor, width: int, offset: int, cols: int) -> torch.Tensor:
    """Return the float32 weight (rows, cols) = (code - offset) * scale[row, col // group]."""
    codes = (unpack_words(packed, width, cols) - offset).to(torch.float32)
    s = scale.to(torch.float32)
    if s.dim() == 1:
        return codes * s.unsqueeze(1)
    return codes * s.repeat_interleave(group_size(cols, scale), dim=1)[:, :cols]


def linear_reference(x, packed, scale, bias, width, offset, in_features):
    """Torch reference: dequantize to x's dtype, then F.linear."""
    weight = dequantize(packed, scale, width, offset, in_features).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def conv2d_reference(x, packed, scale, bias, width, offset, weight_shape, stride, padding, dilation, groups):
    """Torch reference: dequantize to x's dtype, then F.conv2d."""
    cols = weight_shape[1] * weight_shape[2] * weight_shape[3]
    weight = dequantize(packed, scale, width, offset, cols).reshape(weight_shape).to(x.dtype)
    return F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)


_REFERENCES = {"linear": linear_reference, "conv2d": conv2d_reference}


def set_implementation(op: str, device_type: str, fn: Callable[..., torch.Tensor] | None) -> None:
    """Run `fn` for op 'linear' or 'conv2d' on tensors of `device_type`; None restores the reference."""
    if op not in _REFERENCES:
        raise ValueError(f"op must be one of {sorted(_REFERENCES)}, got {op!r}")
    if fn is None:
        _IMPLEMENTATIONS.pop((op, device_type), None)
    else:
        _IMPLEMENTATIONS[(op, device_type)] = fn


def implementation(op: str, device_type: str) -> Callable[..., torch.Tensor]:
    """Return the function that runs `op` on `device_type` now."""
    return _IMPLEMENTATIONS.get((op, device_type), _REFERENCES[op])


@torch.library.custom_op("fxpress::lowbit_linear", mutates_args=())
def lowbit_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  width: int, offset: int, in_features: int) -> torch.Tensor:
    """y = x @ dequant(W).T + bias, with W stored as packed codes."""
    return implementation("linear", x.device.type)(x, packed, scale, bias, width, offset, in_features)


@lowbit_linear.register_fake
def _lowbit_linear_fake(x, packed, scale, bias, width, offset, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[1]))


@torch.library.custom_op("fxpress::lowbit_conv2d", mutates_args=())
def lowbit_conv2d(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  width: int, offset: int, weight_shape: list[int], stride: list[int], padding: list[int],
                  dilation: list[int], groups: int) -> torch.Tensor:
    """conv2d(x, dequant(W)) + bias, with W stored as packed codes of its (out, in*kh*kw) matrix."""
    fn = implementation("conv2d", x.device.type)
    return fn(x, packed, scale, bias, width, offset, weight_shape, stride, padding, dilation, groups)


@lowbit_conv2d.register_fake
def _lowbit_conv2d_fake(x, packed, scale, bias, width, offset, weight_shape, stride, padding, dilation, groups):
    h, w = x.shape[-2:]
    kh, kw = weight_shape[2], weight_shape[3]
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((*x.shape[:-3], weight_shape[0], out_h, out_w))
