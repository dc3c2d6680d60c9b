"""Low-bit custom ops (`fxpress::lowbit_linear`, `fxpress::lowbit_conv2d`) and their torch reference.

Weights arrive as K-major int32 words of `width`-bit codes (see packing.pack_words) plus scales:
per output channel, shape (N,), or group-wise, shape (N, G) with groups of ceil(K / G) inputs.
These two ops always run the torch reference (dequantize, then the dense op); they are what
exporters translate. Which kernels a layer runs is a property of that layer (`kernels`, a name
registered here with `register_kernels`), never of the process: a backend such as Triton registers
its own pair of ops with the same signature and lowering sets the name on the layers it lowers, so a
lowered model and an unlowered one in the same process run different kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fxpress.kernels.packing import unpack_words

__all__ = ["REFERENCE", "conv2d_reference", "dequantize", "kernels_for", "linear_reference", "lowbit_conv2d",
           "lowbit_linear", "register_input_gradients", "register_kernels", "registered_kernels", "unpack_words"]

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


REFERENCE = "reference"
_KERNELS: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {}


def register_kernels(name: str, linear: Callable[..., torch.Tensor], conv2d: Callable[..., torch.Tensor]) -> None:
    """Make `name` a choice for a low-bit layer's `kernels`: `linear`/`conv2d` take the reference ops' arguments."""
    if name == REFERENCE:
        raise ValueError(f"{REFERENCE!r} names the torch reference ops and cannot be replaced")
    _KERNELS[name] = (linear, conv2d)


def kernels_for(name: str) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """Return the (linear, conv2d) ops registered as `name`; raises KeyError naming the registered ones."""
    if name == REFERENCE:
        return torch.ops.fxpress.lowbit_linear, torch.ops.fxpress.lowbit_conv2d
    if name not in _KERNELS:
        raise KeyError(f"no low-bit kernels named {name!r}; registered: {[REFERENCE, *_KERNELS]}")
    return _KERNELS[name]


def registered_kernels() -> list[str]:
    """Return the names a low-bit layer's `kernels` may take."""
    return [REFERENCE, *_KERNELS]


@torch.library.custom_op("fxpress::lowbit_linear", mutates_args=())
def lowbit_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  width: int, offset: int, in_features: int) -> torch.Tensor:
    """y = x @ dequant(W).T + bias, with W stored as packed codes."""
    return linear_reference(x, packed, scale, bias, width, offset, in_features)


def linear_fake(x, packed, scale, bias, width, offset, in_features):
    """The output of a low-bit linear op as an empty tensor (shape and dtype only, for tracing)."""
    return x.new_empty((*x.shape[:-1], packed.shape[1]))


lowbit_linear.register_fake(linear_fake)


@torch.library.custom_op("fxpress::lowbit_conv2d", mutates_args=())
def lowbit_conv2d(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  width: int, offset: int, weight_shape: list[int], stride: list[int], padding: list[int],
                  dilation: list[int], groups: int) -> torch.Tensor:
    """conv2d(x, dequant(W)) + bias, with W stored as packed codes of its (out, in*kh*kw) matrix."""
    return conv2d_reference(x, packed, scale, bias, width, offset, weight_shape, stride, padding, dilation, groups)


def conv2d_fake(x, packed, scale, bias, width, offset, weight_shape, stride, padding, dilation, groups):
    """The output of a low-bit conv2d op as an empty tensor (shape and dtype only, for tracing)."""
    h, w = x.shape[-2:]
    kh, kw = weight_shape[2], weight_shape[3]
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((*x.shape[:-3], weight_shape[0], out_h, out_w))


lowbit_conv2d.register_fake(conv2d_fake)


# Gradients flow to the input only: packed codes, scales and bias are frozen buffers. That is what
# training a branch beside a low-bit layer (QLoRA-style) needs from the layers after it.
def _linear_setup(ctx, inputs, output) -> None:
    x, packed, scale, _bias, width, offset, in_features = inputs
    ctx.save_for_backward(packed, scale)
    ctx.geometry = (width, offset, in_features)


def _linear_backward(ctx, grad: torch.Tensor):
    packed, scale = ctx.saved_tensors
    width, offset, in_features = ctx.geometry
    weight = dequantize(packed, scale, width, offset, in_features).to(grad.dtype)
    return grad @ weight, None, None, None, None, None, None


def _conv2d_setup(ctx, inputs, output) -> None:
    x, packed, scale, _bias, width, offset, weight_shape, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(packed, scale)
    ctx.geometry = (tuple(x.shape), width, offset, list(weight_shape), stride, padding, dilation, groups)


def _conv2d_backward(ctx, grad: torch.Tensor):
    packed, scale = ctx.saved_tensors
    x_shape, width, offset, weight_shape, stride, padding, dilation, groups = ctx.geometry
    cols = weight_shape[1] * weight_shape[2] * weight_shape[3]
    weight = dequantize(packed, scale, width, offset, cols).reshape(weight_shape).to(grad.dtype)
    grad_x = torch.nn.grad.conv2d_input(x_shape, weight, grad, stride, padding, dilation, groups)
    return grad_x, None, None, None, None, None, None, None, None, None, None


def register_input_gradients(linear_op, conv2d_op) -> None:
    """Give a pair of low-bit ops (the reference ones, or a backend's) the gradient with respect to x."""
    linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)
    conv2d_op.register_autograd(_conv2d_backward, setup_context=_conv2d_setup)


register_input_gradients(lowbit_linear, lowbit_conv2d)
