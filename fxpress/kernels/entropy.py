"""Entropy coding of integer codes with rANS (the constriction library).

Each stream carries its symbol counts, so the decoder rebuilds the exact same model. The cost is
the codes' empirical entropy plus a few words; uniform codes cost log2(levels) bits each.
"""

from __future__ import annotations

import constriction
import numpy as np


def _model(counts: np.ndarray):
    probabilities = counts.astype(np.float64) / max(int(counts.sum()), 1)
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def encode(codes: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (compressed uint32 words, symbol counts) for unsigned codes in 0..levels-1."""
    flat = np.ascontiguousarray(codes, dtype=np.int32).reshape(-1)
    counts = np.bincount(flat, minlength=levels).astype(np.int32 if flat.size < 2**31 else np.int64)
    if counts.size != levels:
        raise ValueError(f"codes exceed {levels} levels")
    coder = constriction.stream.stack.AnsCoder()
    if flat.size:
        coder.encode_reverse(flat, _model(counts))
    return coder.get_compressed(), counts


def decode(words: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Inverse of encode: return the int32 codes. Raises ValueError if the stream is inconsistent."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int32)
    coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
    codes = coder.decode(_model(counts), total)
    if not coder.is_empty():
        raise ValueError("entropy-coded stream has trailing data")
    if not np.array_equal(np.bincount(codes, minlength=counts.size), counts):
        raise ValueError("entropy-coded stream does not match its symbol counts")
    return codes


def entropy_bits(counts: np.ndarray) -> float:
    """Return the empirical entropy in bits per symbol."""
    p = counts[counts > 0].astype(np.float64) / counts.sum()
    return float(-(p * np.log2(p)).sum())
