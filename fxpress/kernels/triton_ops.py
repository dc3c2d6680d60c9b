"""The Triton kernels as ops of their own (`fxpress::lowbit_linear_triton`, `fxpress::lowbit_conv2d_triton`).

Same arguments and meaning as the reference ops in `ops`; registered as the "triton" kernels, which a
low-bit layer runs once `backends.triton.lower` sets its `kernels` to that name. Being custom ops, they
stay opaque to torch.compile and torch.export like the reference ones.
"""

from __future__ import annotations

import torch

from fxpress.kernels import ops, triton_dispatch

NAME = "triton"


@torch.library.custom_op("fxpress::lowbit_linear_triton", mutates_args=())
def lowbit_linear_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                         width: int, offset: int, in_features: int) -> torch.Tensor:
    """fxpress::lowbit_linear on the Triton dispatcher (fused GEMM/GEMV or dequantize + cuBLAS)."""
    return triton_dispatch.linear(x, packed, scale, bias, width, offset, in_features)


lowbit_linear_triton.register_fake(ops.linear_fake)


@torch.library.custom_op("fxpress::lowbit_conv2d_triton", mutates_args=())
def lowbit_conv2d_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                         width: int, offset: int, weight_shape: list[int], stride: list[int], padding: list[int],
                         dilation: list[int], groups: int) -> torch.Tensor:
    """fxpress::lowbit_conv2d on the Triton dispatcher (implicit-GEMM conv or dequantize + cuDNN)."""
    return triton_dispatch.conv2d(x, packed, scale, bias, width, offset, weight_shape, stride, padding, dilation,
                                  groups)


lowbit_conv2d_triton.register_fake(ops.conv2d_fake)
ops.register_input_gradients(lowbit_linear_triton, lowbit_conv2d_triton)
ops.register_kernels(NAME, torch.ops.fxpress.lowbit_linear_triton, torch.ops.fxpress.lowbit_conv2d_triton)
