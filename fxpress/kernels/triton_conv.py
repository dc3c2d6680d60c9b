"""Triton low-bit conv2d as an implicit GEMM: output pixels x output channels, reduced over (c, kh, kw).

Activations are gathered straight from the input tensor by their strides (NCHW or channels-last), so
nothing is unfolded in memory; weights are decoded from packed words as in the GEMM. Grouped
convolutions are not covered here (the dispatcher sends them through dequantize + cuDNN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxpress.kernels.kernel_config import KernelConfig, dot_settings, magic_fp16
from fxpress.kernels.ops import group_size
from fxpress.kernels.triton_decode import accumulate, epilogue, load_weights, tile_ids


@triton.jit
def _lowbit_conv2d_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, C, H, W, OH, OW, M, N, K,
                          stride_xb, stride_xc, stride_xh, stride_xw, stride_wk, stride_wn, stride_sn, stride_sg,
                          stride_yb, stride_yc, stride_yh, stride_yw, offset, group,
                          conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
                          KH: tl.constexpr, KW: tl.constexpr, WIDTH: tl.constexpr, GROUPED: tl.constexpr,
                          MAGIC: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    b = offs_m // (OH * OW)
    pixel = offs_m % (OH * OW)
    oh = pixel // OW
    ow = pixel % OW
    ih0 = oh * conv_sh - pad_h
    iw0 = ow * conv_sw - pad_w
    x_row = x_ptr + b * stride_xb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kt * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        c = offs_k // (KH * KW)
        tap = offs_k % (KH * KW)
        ih = ih0[:, None] + (tap // KW * dil_h)[None, :]
        iw = iw0[:, None] + (tap % KW * dil_w)[None, :]
        ok = m_ok[:, None] & (offs_k < K)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x = tl.load(x_row[:, None] + c[None, :] * stride_xc + ih * stride_xh + iw * stride_xw, mask=ok, other=0.0)
        w = load_weights(w_ptr, s_ptr, k0, offs_k, offs_n, K, N, stride_wk, stride_wn, stride_sn, stride_sg,
                         offset, group, WIDTH, GROUPED, MAGIC, BLOCK_K, BLOCK_N)
        acc = accumulate(acc, x, w, UPCAST, DOT_PRECISION)
    acc = epilogue(acc, s_ptr, b_ptr, offs_n, N, stride_sn, True, GROUPED, HAS_BIAS)
    y = y_ptr + (b * stride_yb + oh * stride_yh + ow * stride_yw)[:, None] + offs_n[None, :] * stride_yc
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_n[None, :] < N))


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Return one spatial output size of a zero-padded convolution."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def lowbit_conv2d(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  width: int, offset: int, weight_shape: list[int], stride: list[int], padding: list[int],
                  dilation: list[int], config: KernelConfig) -> torch.Tensor:
    """Return conv2d(x, dequant(W)) + bias for a (B, C, H, W) input and groups == 1."""
    B, C, H, W = x.shape
    N, Cw, KH, KW = weight_shape
    if Cw != C:
        raise ValueError(f"implicit-GEMM conv needs groups == 1: input has {C} channels, weight {Cw}")
    OH = conv_output_size(H, KH, stride[0], padding[0], dilation[0])
    OW = conv_output_size(W, KW, stride[1], padding[1], dilation[1])
    K, M = C * KH * KW, B * OH * OW
    grouped = scale.dim() == 2
    group = group_size(K, scale)
    y = torch.empty((B, N, OH, OW), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                    and not x.is_contiguous() else torch.contiguous_format)
    if M == 0 or N == 0:
        return y
    upcast, precision = dot_settings(x.dtype)
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n),)
    _lowbit_conv2d_kernel[grid](
        x, packed, scale, bias if bias is not None else scale, y, C, H, W, OH, OW, M, N, K,
        *x.stride(), packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1) if grouped else 0,
        *y.stride(), offset, group, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=KH, KW=KW, WIDTH=width, GROUPED=grouped, MAGIC=magic_fp16(x.dtype, width, grouped),
        HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        UPCAST=upcast, DOT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages)
    return y
