"""Triton low-bit GEMV for a few rows (M <= 4): CUDA-core FMAs on weights decoded in registers.

At M <= 16 the tensor-core GEMM is bound by per-weight work, not bytes (H200: W1..W8 within 15% of
each other), most of it the shuffle of each decoded tile into the mma operand layout. Here nothing is
shuffled: each weight is decoded to fp32 with a bit trick (0x4B000000 | code read as fp32 is exactly
2**23 + code) and multiplied into a per-element accumulator that is reduced over K once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxpress.kernels.kernel_config import KernelConfig
from fxpress.kernels.triton_decode import epilogue, load_codes, load_weights
from fxpress.kernels.triton_matmul import gemm_arguments, sum_splits

MAX_ROWS = 4


@triton.jit
def _lowbit_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                        stride_xm, stride_xk, stride_wk, stride_wn, stride_sn, stride_sg,
                        stride_ys, stride_ym, stride_yn, offset, group, split_k,
                        WIDTH: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
                        M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, M_PAD)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((M_PAD, BLOCK_K, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K * split_k)):
        k0 = (kt * split_k + pid_k) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        if GROUPED:
            w = load_weights(w_ptr, s_ptr, k0, offs_k, offs_n, K, N, stride_wk, stride_wn, stride_sn, stride_sg,
                             offset, group, WIDTH, GROUPED, False, BLOCK_K, BLOCK_N)
        else:
            codes = load_codes(w_ptr, k0, offs_k, offs_n, K, N, stride_wk, stride_wn, WIDTH, BLOCK_K, BLOCK_N,
                               False)
            w = (codes | 0x4B000000).to(tl.float32, bitcast=True)
            w = w - (tl.full((), 8388608, tl.int32) + offset).to(tl.float32)
        acc += x[:, :, None] * w[None, :, :]
    out = epilogue(tl.sum(acc, axis=1), s_ptr, b_ptr, offs_n, N, stride_sn, pid_k == 0, GROUPED, HAS_BIAS)
    y = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, out.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def lowbit_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                width: int, offset: int, in_features: int, config: KernelConfig) -> torch.Tensor:
    """Return x (M, K) @ dequant(W).T + bias for M <= 4; config.block_m is ignored (rows pad to 1, 2 or 4)."""
    M = x.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"the GEMV kernel takes at most {MAX_ROWS} rows, got {M}")
    y, split, args = gemm_arguments(x, packed, scale, bias, offset, config)
    if not args:
        return y
    grid = (triton.cdiv(y.shape[1], config.block_n), split)
    _lowbit_gemv_kernel[grid](
        *args, WIDTH=width, GROUPED=scale.dim() == 2, HAS_BIAS=bias is not None,
        M_PAD=1 if M == 1 else 2 if M == 2 else 4, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return sum_splits(args[4], y) if split > 1 else y
