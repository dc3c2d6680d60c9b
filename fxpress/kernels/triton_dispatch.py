"""Triton implementations of the two low-bit ops: per shape, the tuned choice of kernel or dequant + dense.

Small M (a few tokens): the tensor-core kernel, split-K so the whole GPU works, for up to 16 rows the
transposed small-M kernel (weights as the MMA's wide side, triton_small_m), and for up to 4 rows the
CUDA-core GEMV. Measured on an H200, the first is bound by per-weight decode and operand-layout work
there, not by bytes (W1 to W8 within 15%), so it only matches fp16 cuBLAS; the small-M kernel is what
is meant to turn fewer bytes into speed (GPU figures pending). Tuning keys name the packed layout.
Large M is compute-bound: the tuner picks dequantize + cuBLAS/cuDNN there (0.92-0.96x of fp16 at
4096 tokens), whose tiles beat ours, for one extra pass over the weight. Every candidate is timed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fxpress.kernels import triton_conv, triton_dequant, triton_gemv, triton_matmul, triton_small_m
from fxpress.kernels.kernel_config import KernelConfig, interpreting
from fxpress.kernels.packing import is_output_major
from fxpress.kernels.tuning import DEQUANT, TUNER, Choice

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_FUSED_WIDTH = 8  # codes - offset must be exact in fp16/bf16 tiles


def _pow2_at_least(n: int, low: int, high: int) -> int:
    p = low
    while p < n and p < high:
        p *= 2
    return p


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (1 elsewhere: the interpreter)."""
    return _multiprocessors(device.index or 0) if device.type == "cuda" else 1


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def _split_for(m_tiles: int, n_tiles: int, k_tiles: int, sms: int) -> int:
    """Split K until there are one to two programs per multiprocessor, keeping >= 4 K tiles per split."""
    split = 1
    while m_tiles * n_tiles * split * 2 <= 2 * sms and split * 4 <= k_tiles and split < 16:
        split *= 2
    return split


def linear_candidates(M: int, N: int, K: int, sms: int, fused: bool) -> list[Choice]:
    """Return the choices worth timing for an (M, K) x (K, N) low-bit GEMM, the default first."""
    if not fused:
        return [DEQUANT]
    if interpreting():
        # few, large programs: the interpreter pays per program and per op, not per element
        bm, bn, bk = _pow2_at_least(M, 16, 256), _pow2_at_least(N, 16, 256), _pow2_at_least(K, 32, 256)
        return [Choice("fused", KernelConfig(bm, bn, bk, 1, num_warps=4, num_stages=1))]
    if M <= 16:
        shapes = [(16, 64, 256, 4, 4), (16, 32, 256, 4, 4), (16, 16, 512, 4, 3), (16, 128, 128, 4, 3)]
    elif M <= 256:
        shapes = [(32, 64, 128, 4, 4), (64, 64, 128, 4, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3)]
    else:
        shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
    choices = []
    for bm, bn, bk, warps, stages in shapes:
        split = _split_for(-(-M // bm), -(-N // bn), -(-K // bk), sms)
        choices.append(Choice("fused", KernelConfig(bm, bn, bk, split, 8, warps, stages)))
        if split > 1 and M <= 16:  # one launch instead of two can beat a fuller GPU
            choices.append(Choice("fused", KernelConfig(bm, bn, bk, 1, 8, warps, stages)))
    if M <= triton_small_m.MAX_ROWS:  # weights as the MMA's wide side, split-K over every multiprocessor
        choices += small_m_candidates(N, K, sms)
    if M <= triton_gemv.MAX_ROWS:  # CUDA-core GEMV: no operand shuffle; unmeasured on a GPU so far, so not first
        for bn, bk in ((64, 64), (128, 32), (32, 128)) if M == 1 else ((64, 32), (128, 16)):
            split = _split_for(1, -(-N // bn), -(-K // bk), sms)
            choices.append(Choice("gemv", KernelConfig(1, bn, bk, split, 1, 4, 3)))
    if M > 64:
        choices.insert(0 if M > 256 else len(choices), DEQUANT)
    return choices


def small_m_candidates(N: int, K: int, sms: int) -> list[Choice]:
    """Return the small-M (transposed) kernel's choices: tiles, and split-K at one-two programs per
    multiprocessor and at twice that (more loads in flight per multiprocessor)."""
    choices = []
    for bn, bk, warps, stages in ((64, 256, 4, 4), (128, 128, 4, 4), (64, 128, 4, 3), (32, 256, 4, 4),
                                  (128, 256, 8, 3)):
        split = _split_for(1, -(-N // bn), -(-K // bk), sms)
        for s in sorted({split, min(2 * split, max(1, -(-K // bk) // 2))}):
            choices.append(Choice("small_m", KernelConfig(16, bn, bk, s, 1, warps, stages)))
    return choices


def conv_candidates(M: int, N: int, K: int, fused: bool, sms: int = 1) -> list[Choice]:
    """Return the choices worth timing for an implicit-GEMM conv with M output pixels, the default first
    (at most 16 pixels also try the small-M kernel on the unfolded input)."""
    if not fused:
        return [DEQUANT]
    if interpreting():
        bm, bn, bk = _pow2_at_least(M, 16, 512), _pow2_at_least(N, 16, 128), _pow2_at_least(K, 32, 256)
        return [Choice("fused", KernelConfig(bm, bn, bk, num_warps=4, num_stages=1))]
    if M <= 256:
        shapes = [(64, 64, 64, 4, 3), (32, 64, 128, 4, 3), (64, 128, 64, 4, 3)]
    else:
        shapes = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 3), (128, 256, 64, 8, 3)]
    choices = [Choice("fused", KernelConfig(bm, bn, bk, 1, 8, w, s)) for bm, bn, bk, w, s in shapes]
    if M <= triton_small_m.MAX_ROWS:
        choices += small_m_candidates(N, K, sms)
    choices.insert(0 if M > 256 else len(choices), DEQUANT)
    return choices


def _m_bucket(M: int) -> int:
    return _pow2_at_least(M, 1, 1 << 30)


def linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
           width: int, offset: int, in_features: int) -> torch.Tensor:
    """Triton implementation of fxpress::lowbit_linear."""
    x2 = x.reshape(-1, in_features)
    M, N, K = x2.shape[0], packed.shape[1], in_features

    def run(choice: Choice) -> torch.Tensor:
        if choice.path == "dequant":
            weight = triton_dequant.dequantize(packed, scale, width, offset, K, x.dtype)
            return F.linear(x2, weight, None if bias is None else bias.to(x.dtype))
        if choice.path == "gemv":
            return triton_gemv.lowbit_gemv(x2, packed, scale, bias, width, offset, K, choice.config)
        if choice.path == "small_m":
            return triton_small_m.lowbit_small_m(x2, packed, scale, bias, width, offset, K, choice.config)
        return triton_matmul.lowbit_matmul(x2, packed, scale, bias, width, offset, K, choice.config)

    om = is_output_major(packed)  # the packed words' layout (see packing.output_major)
    fast_key = ("linear", x.device, x.dtype, width, scale.dim(), M, N, K, om)
    choice = TUNER.fast(fast_key)
    if choice is None:
        fused = width <= MAX_FUSED_WIDTH and x.dtype in FUSED_DTYPES
        key = (f"linear|{_device_name(x.device)}|{str(x.dtype)[6:]}|w{width}|g{scale.dim() == 2}"
               f"|m{_m_bucket(M)}|n{N}|k{K}" + ("|om" if om else ""))
        choice = TUNER.choose(key, linear_candidates(M, N, K, _sms(x.device), fused), run)
        TUNER.remember_fast(fast_key, choice)
    return run(choice).reshape(*x.shape[:-1], N)


def conv2d(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, width: int,
           offset: int, weight_shape: list[int], stride: list[int], padding: list[int], dilation: list[int],
           groups: int) -> torch.Tensor:
    """Triton implementation of fxpress::lowbit_conv2d."""
    squeeze = x.dim() == 3
    x4 = x.unsqueeze(0) if squeeze else x
    B, C, H, W = x4.shape
    N, _, KH, KW = weight_shape

    def run(choice: Choice) -> torch.Tensor:
        if choice.path == "dequant":
            cols = weight_shape[1] * KH * KW
            weight = triton_dequant.dequantize(packed, scale, width, offset, cols, x.dtype).view(weight_shape)
            return F.conv2d(x4, weight, None if bias is None else bias.to(x.dtype), stride, padding, dilation,
                            groups)
        if choice.path == "small_m":
            return _unfolded_conv(x4, packed, scale, bias, width, offset, weight_shape, stride, padding, dilation,
                                  choice.config)
        return triton_conv.lowbit_conv2d(x4, packed, scale, bias, width, offset, weight_shape, stride, padding,
                                         dilation, choice.config)

    channels_last = x4.is_contiguous(memory_format=torch.channels_last) and not x4.is_contiguous()
    om = is_output_major(packed)
    fast_key = ("conv2d", x.device, x.dtype, width, scale.dim(), tuple(x4.shape), tuple(weight_shape), tuple(stride),
                tuple(padding), tuple(dilation), groups, channels_last, om)
    choice = TUNER.fast(fast_key)
    if choice is None:
        fused = groups == 1 and width <= MAX_FUSED_WIDTH and x.dtype in FUSED_DTYPES
        OH = triton_conv.conv_output_size(H, KH, stride[0], padding[0], dilation[0])
        OW = triton_conv.conv_output_size(W, KW, stride[1], padding[1], dilation[1])
        key = (f"conv2d|{_device_name(x.device)}|{str(x.dtype)[6:]}|w{width}|g{scale.dim() == 2}"
               f"|x{B}x{C}x{H}x{W}|w{N}x{KH}x{KW}|s{stride}|p{padding}|d{dilation}|grp{groups}|cl{channels_last}"
               + ("|om" if om else ""))
        candidates = conv_candidates(B * OH * OW, N, weight_shape[1] * KH * KW, fused, _sms(x.device))
        choice = TUNER.choose(key.replace(" ", ""), candidates, run)
        TUNER.remember_fast(fast_key, choice)
    y = run(choice)
    return y.squeeze(0) if squeeze else y


def _unfolded_conv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, width: int,
                   offset: int, weight_shape: list[int], stride: list[int], padding: list[int], dilation: list[int],
                   config: KernelConfig) -> torch.Tensor:
    """A conv with at most 16 output pixels as a small-M GEMM: unfold the input (B * OH * OW rows of
    C * KH * KW inputs, in the weight's order), multiply, fold the rows back into (B, N, OH, OW)."""
    B, _, H, W = x.shape
    N, C, KH, KW = weight_shape
    OH = triton_conv.conv_output_size(H, KH, stride[0], padding[0], dilation[0])
    OW = triton_conv.conv_output_size(W, KW, stride[1], padding[1], dilation[1])
    cols = F.unfold(x, (KH, KW), dilation=dilation, padding=padding, stride=stride)  # (B, C*KH*KW, OH*OW)
    rows = cols.transpose(1, 2).reshape(B * OH * OW, C * KH * KW)
    y = triton_small_m.lowbit_small_m(rows, packed, scale, bias, width, offset, C * KH * KW, config)
    return y.reshape(B, OH, OW, N).permute(0, 3, 1, 2).contiguous()
