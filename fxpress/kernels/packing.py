"""Bit-packing formats for integer weight codes.

* radix: `digits` base-L codes per `word_bits`-bit word, within 1% of log2(L) bits per code where a
  word of at most 64 bits allows it (fixed rate, random access by word).
* aligned: row-aligned 1/2/4/8/16 bits per code, the layout kernels read at run time.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ALIGNED_WIDTHS = (1, 2, 4, 8, 16)


def radix_plan(levels: int, max_word_bits: int = 64) -> tuple[int, int]:
    """Return (digits, word_bits) with levels**digits <= 2**word_bits and the fewest bits per code."""
    if levels < 2:
        raise ValueError(f"need at least 2 levels, got {levels}")
    best = (1, math.ceil(math.log2(levels)))
    for digits in range(1, max_word_bits + 1):
        word_bits = math.ceil(digits * math.log2(levels) - 1e-12)
        while levels**digits > 2**word_bits:
            word_bits += 1
        if word_bits > max_word_bits:
            break
        if word_bits / digits < best[1] / best[0] - 1e-12:
            best = (digits, word_bits)
    return best


def _words_to_bits(words: np.ndarray, word_bits: int) -> np.ndarray:
    as_bytes = words.astype("<u8").view(np.uint8).reshape(-1, 8)
    bits = np.unpackbits(as_bytes, axis=1, bitorder="little")
    return bits[:, :word_bits].reshape(-1)


def pack_radix(codes: np.ndarray, levels: int) -> np.ndarray:
    """Pack unsigned codes (0..levels-1) into a uint8 stream at radix_plan(levels) density."""
    digits, word_bits = radix_plan(levels)
    flat = np.asarray(codes, dtype=np.uint64).reshape(-1)
    pad = (-flat.size) % digits
    grouped = np.concatenate([flat, np.zeros(pad, np.uint64)]).reshape(-1, digits)
    words = np.zeros(grouped.shape[0], np.uint64)
    for column in range(digits - 1, -1, -1):  # Horner: most significant digit last
        words = words * np.uint64(levels) + grouped[:, column]
    return np.packbits(_words_to_bits(words, word_bits), bitorder="little")


def unpack_radix(stream: np.ndarray, levels: int, count: int) -> np.ndarray:
    """Inverse of pack_radix: return `count` codes as int64."""
    digits, word_bits = radix_plan(levels)
    n_words = -(-count // digits)
    bits = np.unpackbits(stream, bitorder="little")[: n_words * word_bits].reshape(n_words, word_bits)
    padded = np.zeros((n_words, 64), np.uint8)
    padded[:, :word_bits] = bits
    words = np.packbits(padded, axis=1, bitorder="little").view("<u8").reshape(-1)
    out = np.empty((n_words, digits), np.uint64)
    for column in range(digits):
        out[:, column] = words % np.uint64(levels)
        words = words // np.uint64(levels)
    return out.reshape(-1)[:count].astype(np.int64)


def aligned_width(levels: int) -> int:
    """Return the smallest of 1/2/4/8/16 bits per code that holds `levels` values."""
    for width in ALIGNED_WIDTHS:
        if levels <= 2**width:
            return width
    raise ValueError(f"{levels} levels do not fit 16 bits")


def pack_aligned(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack unsigned codes of shape (rows, cols) into rows of `width`-bit fields (uint8, or int16)."""
    if width == 16:
        return codes.to(torch.int16)
    if width == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // width
    rows, cols = codes.shape
    pad = (-cols) % per_byte
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad)).reshape(rows, -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.uint8) * width
    return (c << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_aligned(packed: torch.Tensor, width: int, cols: int) -> torch.Tensor:
    """Inverse of pack_aligned: return codes of shape (rows, cols) as int32."""
    if width >= 8:
        return packed.to(torch.int32)[:, :cols]
    per_byte = 8 // width
    shifts = torch.arange(per_byte, dtype=torch.uint8) * width
    mask = (1 << width) - 1
    fields = (packed.unsqueeze(-1) >> shifts) & mask
    return fields.reshape(packed.shape[0], -1)[:, :cols].to(torch.int32)
