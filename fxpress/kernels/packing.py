"""Bit-packing formats for integer weight codes.

* radix: `digits` base-L codes per `word_bits`-bit word, within 1% of log2(L) bits per code where a
  word of at most 64 bits allows it (fixed rate, random access by word).
* words: ceil(log2(L))-bit codes cut into power-of-two bit slices, each packed K-major in int32
  words: the layout kernels read at run time.
"""

from __future__ import annotations

import math

import numpy as np
import torch


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


def field_width(levels: int) -> int:
    """Return the bits per code the run-time layout uses for `levels` values: ceil(log2(levels)), 1..16."""
    if not 2 <= levels <= 2**16:
        raise ValueError(f"{levels} levels do not fit 1..16-bit fields")
    return max(1, math.ceil(math.log2(levels) - 1e-12))


def width_parts(width: int) -> list[int]:
    """Split a code width into power-of-two bit slices, widest first: 7 -> [4, 2, 1], 5 -> [4, 1]."""
    if not 1 <= width <= 16:
        raise ValueError(f"code width must be 1..16 bits, got {width}")
    return [bits for bits in (16, 8, 4, 2, 1) if width & bits]


def fields_per_word(bits: int) -> int:
    """Return how many `bits`-bit fields one 32-bit word holds."""
    return 32 // bits


def packed_rows(width: int, cols: int) -> int:
    """Return the number of word rows pack_words produces for `cols` codes per output."""
    return sum(-(-cols // fields_per_word(bits)) for bits in width_parts(width))


def _pack_slice(fields: torch.Tensor, bits: int) -> torch.Tensor:
    fpw = fields_per_word(bits)
    rows, cols = fields.shape
    padded = torch.nn.functional.pad(fields.t(), (0, 0, 0, (-cols) % fpw)).reshape(-1, fpw, rows)
    shifts = (torch.arange(fpw, dtype=torch.int64, device=fields.device) * bits).view(1, fpw, 1)
    words = (padded << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_words(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack unsigned `width`-bit codes of shape (rows, cols) into int32 words of shape (packed_rows, rows).

    The code is cut into power-of-two bit slices (width_parts), lowest bits in the widest slice;
    each slice is stored K-major, 32 // bits fields per word, field f of word j holding input
    j * fpw + f, and the slices follow each other along dim 0. Every width costs exactly `width`
    bits per weight (plus padding to a word), and a kernel expands any slice with shifts alone.
    """
    codes = codes.to(torch.int64)
    slices, shift = [], 0
    for bits in width_parts(width):
        slices.append(_pack_slice((codes >> shift) & ((1 << bits) - 1), bits))
        shift += bits
    return torch.cat(slices).contiguous()


def unpack_words(words: torch.Tensor, width: int, cols: int) -> torch.Tensor:
    """Inverse of pack_words: return codes of shape (rows, cols) as int32."""
    codes = torch.zeros((words.shape[1], cols), dtype=torch.int64, device=words.device)
    row, shift = 0, 0
    for bits in width_parts(width):
        fpw = fields_per_word(bits)
        n = -(-cols // fpw)
        part = words[row:row + n].to(torch.int64) & 0xFFFFFFFF
        shifts = (torch.arange(fpw, dtype=torch.int64, device=words.device) * bits).view(1, fpw, 1)
        fields = (part.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        codes |= fields.reshape(-1, words.shape[1])[:cols].t() << shift
        row, shift = row + n, shift + bits
    return codes.to(torch.int32)


def output_major(words: torch.Tensor) -> torch.Tensor:
    """Return pack_words' (packed_rows, rows) words stored output-major: the same values and shape, each
    output's words contiguous (strides (1, packed_rows)), so a kernel reading one output's run of inputs
    loads them as wide vectors."""
    return words.t().contiguous().t()


def is_output_major(words: torch.Tensor) -> bool:
    """True when `words` is stored output-major (see output_major)."""
    return words.dim() == 2 and words.stride(0) == 1 and (words.shape[1] == 1 or words.stride(1) == words.shape[0])
