"""Triton dequantize: packed words to a dense (N, K) weight, for handing large-M work to cuBLAS/cuDNN.

At large M a layer is compute-bound and the dense libraries' tiles beat ours; decoding the weight
costs one pass over N x K, which is small next to M x N x K multiply-adds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxpress.kernels.ops import group_size
from fxpress.kernels.triton_decode import load_weights


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wk, stride_wn, stride_sn, stride_sg,
                    stride_on, stride_ok, offset, group,
                    WIDTH: tl.constexpr, GROUPED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = load_weights(w_ptr, s_ptr, tl.program_id(0) * BLOCK_K, offs_k, offs_n, K, N, stride_wk, stride_wn,
                     stride_sn, stride_sg, offset, group, WIDTH, GROUPED, False, BLOCK_K, BLOCK_N)
    if not GROUPED:
        w = w * tl.load(s_ptr + offs_n * stride_sn, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_n[None, :] * stride_on + offs_k[:, None] * stride_ok
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


def dequantize(packed: torch.Tensor, scale: torch.Tensor, width: int, offset: int, cols: int,
               dtype: torch.dtype, block_k: int = 64, block_n: int = 64) -> torch.Tensor:
    """Return the dense (N, cols) weight (code - offset) * scale in `dtype`."""
    N = packed.shape[1]
    grouped = scale.dim() == 2
    group = group_size(cols, scale)
    out = torch.empty((N, cols), dtype=dtype, device=packed.device)
    grid = (triton.cdiv(cols, block_k), triton.cdiv(N, block_n))
    _dequant_kernel[grid](packed, scale, out, N, cols, packed.stride(0), packed.stride(1), scale.stride(0),
                          scale.stride(1) if grouped else 0, out.stride(0), out.stride(1), offset, group,
                          WIDTH=width, GROUPED=grouped, BLOCK_K=block_k, BLOCK_N=block_n)
    return out
