"""Triton low-bit GEMM for a few rows (M <= 16), computed transposed so the weights fill the MMA tile.

At M <= 16 the usual tile puts the few activation rows on the MMA's M side, padded to 16, and pays for
shuffling every decoded weight tile into the B operand; only BLOCK_N / 64 programs per output row run
on a card with 132 multiprocessors. Here the kernel computes y.T = W @ x.T: BLOCK_N outputs are the
MMA's rows (the weights are the A operand, K-contiguous per output as the math consumes them) and the
padded activation rows its 16 columns. Weights are decoded with bit operations (fp16 activations:
0x6400 | code read as fp16 is exactly 1024 + code, so one OR and one subtract per weight), group
scales multiply the group's partial product once per output, and split-K hands every program an equal
share of K so the whole card streams weights; a second kernel adds the fp32 partials.

Any packed strides work; `packing.output_major` stores each output's words contiguously, which turns
every weight load into wide vector loads (chosen once, when a model is lowered).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxpress.kernels.kernel_config import KernelConfig, dot_settings
from fxpress.kernels.ops import group_size
from fxpress.kernels.triton_decode import epilogue, load_codes
from fxpress.kernels.triton_matmul import gemm_arguments, sum_splits

MAX_ROWS = 16
MIN_BLOCK_K = 32  # a 1-bit slice holds 32 inputs per word: a tile covers whole words of every slice


@triton.jit
def _lowbit_small_m_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                           stride_xm, stride_xk, stride_wk, stride_wn, stride_sn, stride_sg,
                           stride_ys, stride_ym, stride_yn, offset, group, split_k,
                           WIDTH: tl.constexpr, GROUPED: tl.constexpr, SCALE_AFTER: tl.constexpr,
                           MAGIC: tl.constexpr, HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, M_PAD)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K * split_k)):
        k0 = (kt * split_k + pid_k) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_k[:, None] * stride_xk + offs_m[None, :] * stride_xm,
                     mask=(offs_k[:, None] < K) & (offs_m[None, :] < M), other=0.0)
        codes = load_codes(w_ptr, k0, offs_k, offs_n, K, N, stride_wk, stride_wn, WIDTH, BLOCK_K, BLOCK_N, True)
        if MAGIC:
            biased = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            w = biased - (tl.full((), 1024, tl.int32) + offset).to(tl.float16)  # exact: |code - offset| < 1024
        else:
            w = (codes - offset).to(tl.float32)
        if GROUPED and not SCALE_AFTER:  # groups narrower than a tile: scale each weight
            s = tl.load(s_ptr + offs_n[:, None] * stride_sn + (offs_k // group)[None, :] * stride_sg,
                        mask=n_ok[:, None] & (offs_k[None, :] < K), other=0.0)
            w = w.to(tl.float32) * s.to(tl.float32)
        if UPCAST:
            part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(w.to(xt.dtype), xt, input_precision=DOT_PRECISION)
        if GROUPED and SCALE_AFTER:  # the tile lies in one group: scale its partial product once per output
            s = tl.load(s_ptr + offs_n * stride_sn + (k0 // group) * stride_sg, mask=n_ok, other=0.0)
            part = part * s.to(tl.float32)[:, None]
        acc += part
    out = epilogue(tl.trans(acc), s_ptr, b_ptr, offs_n, N, stride_sn, pid_k == 0, GROUPED, HAS_BIAS)
    y = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, out.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_ok[None, :])


def lowbit_small_m(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   width: int, offset: int, in_features: int, config: KernelConfig) -> torch.Tensor:
    """Return x (M, K) @ dequant(W).T + bias for M <= 16; uses config.block_n, block_k (a power of two,
    at least 32), split_k, num_warps and num_stages (rows pad to 16, the smallest MMA width)."""
    M = x.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"the small-M kernel takes at most {MAX_ROWS} rows, got {M}")
    if config.block_k < MIN_BLOCK_K or config.block_k & (config.block_k - 1):
        raise ValueError(f"the small-M kernel needs block_k a power of two >= {MIN_BLOCK_K}, got {config.block_k}")
    y, split, args = gemm_arguments(x, packed, scale, bias, offset, config)
    if not args:
        return y
    grouped = scale.dim() == 2
    scale_after = grouped and group_size(in_features, scale) % config.block_k == 0
    upcast, precision = dot_settings(x.dtype)
    grid = (triton.cdiv(y.shape[1], config.block_n), split)
    _lowbit_small_m_kernel[grid](
        *args, WIDTH=width, GROUPED=grouped, SCALE_AFTER=scale_after,
        MAGIC=x.dtype == torch.float16 and width <= 10 and (not grouped or scale_after),
        HAS_BIAS=bias is not None, M_PAD=MAX_ROWS, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        UPCAST=upcast, DOT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages)
    return sum_splits(args[4], y) if split > 1 else y
