"""Triton device functions that turn packed weight words into weights, shared by every low-bit kernel.

The layout is packing.pack_words: a `WIDTH`-bit code is cut into power-of-two bit slices (7 bits:
4 + 2 + 1), each slice stored K-major as int32 words of 32 // bits fields, field f of word j holding
input k = j * fpw + f, the slices one after another along the word rows. A tile loads each word
once and expands it in registers with shifts; only tiles narrower than a word's fields (BLOCK_K <
fpw) gather a word per input row instead.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_slice(w_ptr, row0, k0, offs_k, offs_n, K, N, stride_wk, stride_wn,
               BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Return one bit slice's fields for inputs offs_k x outputs offs_n, int32; the slice starts at word row0."""
    FPW: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    n_ok = offs_n < N
    base = w_ptr + row0 * stride_wk
    if BLOCK_K % FPW == 0:
        rows = k0 // FPW + tl.arange(0, BLOCK_K // FPW)
        words = tl.load(base + rows[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=(rows[:, None] < tl.cdiv(K, FPW)) & n_ok[None, :], other=0)
        shifts = tl.arange(0, FPW) * BITS
        fields = (words[:, None, :] >> shifts[None, :, None]) & MASK
        return tl.reshape(fields, (BLOCK_K, BLOCK_N))
    words = tl.load(base + (offs_k // FPW)[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(offs_k[:, None] < K) & n_ok[None, :], other=0)
    return (words >> ((offs_k % FPW) * BITS)[:, None]) & MASK


@triton.jit
def load_output_slice(w_ptr, row0, k0, offs_n, K, N, stride_wk, stride_wn,
                      BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Return one bit slice's fields as [BLOCK_N, BLOCK_K]: outputs offs_n x inputs k0 .. k0 + BLOCK_K (a
    whole number of words: BLOCK_K a multiple of 32 // BITS), each output's words loaded as one run."""
    FPW: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    rows = k0 // FPW + tl.arange(0, BLOCK_K // FPW)
    words = tl.load(w_ptr + (row0 + rows)[None, :] * stride_wk + offs_n[:, None] * stride_wn,
                    mask=(rows[None, :] < tl.cdiv(K, FPW)) & (offs_n[:, None] < N), other=0)
    shifts = tl.arange(0, FPW) * BITS
    fields = (words[:, :, None] >> shifts[None, None, :]) & MASK  # word j, field f = input j * FPW + f
    return tl.reshape(fields, (BLOCK_N, BLOCK_K))


@triton.jit
def add_slice(codes, row0, w_ptr, k0, offs_k, offs_n, K, N, stride_wk, stride_wn,
              BITS: tl.constexpr, SHIFT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
              BY_OUTPUT: tl.constexpr):
    """OR one slice's fields into `codes` at bit SHIFT; return them with the next slice's first word row."""
    if BY_OUTPUT:
        fields = load_output_slice(w_ptr, row0, k0, offs_n, K, N, stride_wk, stride_wn, BITS, BLOCK_K, BLOCK_N)
    else:
        fields = load_slice(w_ptr, row0, k0, offs_k, offs_n, K, N, stride_wk, stride_wn, BITS, BLOCK_K, BLOCK_N)
    return codes | (fields << SHIFT), row0 + tl.cdiv(K, 32 // BITS)


@triton.jit
def load_codes(w_ptr, k0, offs_k, offs_n, K, N, stride_wk, stride_wn,
               WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BY_OUTPUT: tl.constexpr):
    """Return the unsigned codes of inputs offs_k (= k0 + arange(BLOCK_K)) x outputs offs_n, int32, as
    [BLOCK_K, BLOCK_N], or [BLOCK_N, BLOCK_K] when BY_OUTPUT (the small-M kernel's operand order).

    Slices run widest first (as packing.width_parts); a slice's bits sit above all wider slices'.
    Written out per slice: Triton cannot carry a changing constexpr shift through a static loop.
    """
    if BY_OUTPUT:
        codes = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    else:
        codes = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
    row0 = 0
    args = (w_ptr, k0, offs_k, offs_n, K, N, stride_wk, stride_wn)
    if WIDTH & 16:
        codes, row0 = add_slice(codes, row0, *args, 16, 0, BLOCK_K, BLOCK_N, BY_OUTPUT)
    if WIDTH & 8:
        codes, row0 = add_slice(codes, row0, *args, 8, WIDTH & 16, BLOCK_K, BLOCK_N, BY_OUTPUT)
    if WIDTH & 4:
        codes, row0 = add_slice(codes, row0, *args, 4, WIDTH & 24, BLOCK_K, BLOCK_N, BY_OUTPUT)
    if WIDTH & 2:
        codes, row0 = add_slice(codes, row0, *args, 2, WIDTH & 28, BLOCK_K, BLOCK_N, BY_OUTPUT)
    if WIDTH & 1:
        codes, row0 = add_slice(codes, row0, *args, 1, WIDTH & 30, BLOCK_K, BLOCK_N, BY_OUTPUT)
    return codes


@triton.jit
def load_weights(w_ptr, s_ptr, k0, offs_k, offs_n, K, N, stride_wk, stride_wn, stride_sn, stride_sg, offset, group,
                 WIDTH: tl.constexpr, GROUPED: tl.constexpr, MAGIC: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Return the weight tile [BLOCK_K, BLOCK_N]: code - offset, times the group scale if GROUPED.

    Per-channel scales are left to the caller's epilogue (one multiply per output instead of per
    weight). MAGIC (fp16 activations, codes < 1024) builds fp16 values without an int-to-float
    conversion: the bits 0x6400 | code read as fp16 are exactly 1024 + code.
    """
    codes = load_codes(w_ptr, k0, offs_k, offs_n, K, N, stride_wk, stride_wn, WIDTH, BLOCK_K, BLOCK_N, False)
    if GROUPED:
        s = tl.load(s_ptr + offs_n[None, :] * stride_sn + (offs_k // group)[:, None] * stride_sg,
                    mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        w = (codes - offset).to(tl.float32) * s.to(tl.float32)
    elif MAGIC:
        biased = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        w = biased - (tl.full((), 1024, tl.int32) + offset).to(tl.float16)  # offset may arrive as constexpr 1
    else:
        w = (codes - offset).to(tl.float32)
    return w


@triton.jit
def accumulate(acc, x, w, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Return acc + x @ w with fp32 accumulation; UPCAST runs the product in fp32 (interpreter bf16 quirk)."""
    if UPCAST:
        return tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
    return tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)


@triton.jit
def epilogue(acc, s_ptr, b_ptr, offs_n, N, stride_sn, add_bias, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Apply per-channel scales (unless GROUPED) and, where add_bias, the bias."""
    n_ok = offs_n < N
    if not GROUPED:
        s = tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + tl.where(add_bias, b, 0.0)[None, :]
    return acc


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a flat program id to (pid_m, pid_n), GROUP_M row tiles at a time so weight tiles stay in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n
