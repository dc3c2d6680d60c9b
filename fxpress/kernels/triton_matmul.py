"""Triton low-bit GEMM: y = x @ dequant(W).T (+ bias), read straight from packed words, with split-K.

Split-K (`config.split_k > 1`) gives small-M, small-N problems enough programs to fill the GPU: each
split writes an fp32 partial sum and a second kernel adds them (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxpress.kernels.kernel_config import KernelConfig, dot_settings, magic_fp16
from fxpress.kernels.ops import group_size
from fxpress.kernels.triton_decode import accumulate, epilogue, load_weights, tile_ids


@triton.jit
def _lowbit_matmul_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                          stride_xm, stride_xk, stride_wk, stride_wn, stride_sn, stride_sg,
                          stride_ys, stride_ym, stride_yn, offset, group, split_k,
                          WIDTH: tl.constexpr, GROUPED: tl.constexpr, MAGIC: tl.constexpr,
                          HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K * split_k)):
        k0 = (kt * split_k + pid_k) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = load_weights(w_ptr, s_ptr, k0, offs_k, offs_n, K, N, stride_wk, stride_wn, stride_sn, stride_sg,
                         offset, group, WIDTH, GROUPED, MAGIC, BLOCK_K, BLOCK_N)
        acc = accumulate(acc, x, w, UPCAST, DOT_PRECISION)
    acc = epilogue(acc, s_ptr, b_ptr, offs_n, N, stride_sn, pid_k == 0, GROUPED, HAS_BIAS)
    y = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _sum_splits_kernel(ws_ptr, y_ptr, total, splits, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(ws_ptr + s * total + offs, mask=ok, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def gemm_arguments(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   offset: int, config: KernelConfig) -> tuple[torch.Tensor, int, tuple]:
    """Return (y, split, kernel arguments) shared by the GEMM and GEMV kernels.

    The kernels write y directly, or fp32 partials (split, M, N) when split-K is used; y is returned
    empty-shaped and the arguments are () when there is nothing to compute.
    """
    M, K = x.shape
    N = packed.shape[1]
    grouped = scale.dim() == 2
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y, 1, ()
    split = max(1, min(config.split_k, triton.cdiv(K, config.block_k)))
    out = y if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    args = (x, packed, scale, bias if bias is not None else scale, out, M, N, K,
            x.stride(0), x.stride(1), packed.stride(0), packed.stride(1),
            scale.stride(0), scale.stride(1) if grouped else 0,
            out.stride(0) if split > 1 else 0, out.stride(-2), out.stride(-1),
            offset, group_size(K, scale), split)
    return y, split, args


def lowbit_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  width: int, offset: int, in_features: int, config: KernelConfig) -> torch.Tensor:
    """Return x (M, K) @ dequant(W).T + bias as an (M, N) tensor of x's dtype."""
    y, split, args = gemm_arguments(x, packed, scale, bias, offset, config)
    if not args:
        return y
    M, N = y.shape
    upcast, precision = dot_settings(x.dtype)
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n), split)
    _lowbit_matmul_kernel[grid](
        *args, WIDTH=width, GROUPED=scale.dim() == 2, MAGIC=magic_fp16(x.dtype, width, scale.dim() == 2),
        HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, UPCAST=upcast, DOT_PRECISION=precision, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return sum_splits(args[4], y) if split > 1 else y


def sum_splits(partials: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Write the sum of fp32 split-K partials (splits, M, N) into y (M, N) and return y."""
    splits, total, block = partials.shape[0], y.numel(), 1024
    _sum_splits_kernel[(triton.cdiv(total, block),)](partials, y, total, splits, BLOCK=block)
    return y
