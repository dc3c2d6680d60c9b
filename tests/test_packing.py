"""Pack/unpack round trips and storage density for every width and grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxpress.ir.annotations import QuantSpec
from fxpress.kernels import entropy
from fxpress.kernels.packing import (
    field_width,
    pack_radix,
    pack_words,
    packed_rows,
    radix_plan,
    unpack_radix,
    unpack_words,
    width_parts,
)

ALL_KEYS = [f"b{b}" for b in range(1, 9)] + [f"p{b}" for b in range(1, 9)]
LEVELS = sorted({QuantSpec.from_key(k).levels for k in ALL_KEYS})


@settings(max_examples=40, deadline=None)
@given(levels=st.sampled_from(LEVELS), data=st.data())
def test_radix_round_trip(levels, data):
    count = data.draw(st.integers(0, 300))
    codes = np.array(data.draw(st.lists(st.integers(0, levels - 1), min_size=count, max_size=count)), np.int64)
    packed = pack_radix(codes, levels)
    assert np.array_equal(unpack_radix(packed, levels, count), codes)


@settings(max_examples=40, deadline=None)
@given(levels=st.sampled_from(LEVELS), rows=st.integers(1, 5), cols=st.integers(1, 40), seed=st.integers(0, 99))
def test_word_round_trip(levels, rows, cols, seed):
    codes = torch.randint(0, levels, (rows, cols), generator=torch.Generator().manual_seed(seed))
    width = field_width(levels)
    words = pack_words(codes, width)
    assert words.dtype == torch.int32 and words.shape == (packed_rows(width, cols), rows)
    assert torch.equal(unpack_words(words, width, cols), codes.to(torch.int32))


def test_word_layout_bits():
    """Field f of word j holds column j*fpw + f at bit f*bits; wider codes split into power-of-two slices."""
    codes = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] * 2 + [1]])
    assert pack_words(codes, 1).tolist() == [[0b1101 | 0b1101 << 16], [1]]
    assert pack_words(torch.tensor([[0] * 31 + [1]]), 1).item() == -(2**31)  # the top field sets the sign bit
    three_bit = pack_words(torch.tensor([[5, 2, 7]]), 3)  # low 2 bits in a 2-bit slice, bit 2 in a 1-bit slice
    assert three_bit.tolist() == [[1 | 2 << 2 | 3 << 4], [1 | 0 << 1 | 1 << 2]]
    assert field_width(3) == 2 and field_width(5) == 3 and field_width(17) == 5
    assert width_parts(7) == [4, 2, 1] and packed_rows(3, 100) == 7 + 4 and packed_rows(8, 10) == 3


@settings(max_examples=30, deadline=None)
@given(levels=st.sampled_from(LEVELS), data=st.data())
def test_entropy_round_trip(levels, data):
    count = data.draw(st.integers(0, 500))
    codes = np.array(data.draw(st.lists(st.integers(0, levels - 1), min_size=count, max_size=count)), np.int32)
    words, counts = entropy.encode(codes, levels)
    assert np.array_equal(entropy.decode(words, counts), codes)


@pytest.mark.parametrize("key", ALL_KEYS)
def test_stored_bits_within_one_percent_of_log2_levels(key):
    """Uniform codes are the worst case: the artifact codec stays within 1% of log2(levels)."""
    levels = QuantSpec.from_key(key).levels
    codes = np.random.default_rng(0).integers(0, levels, 200_000).astype(np.int32)
    words, _ = entropy.encode(codes, levels)
    assert words.nbytes * 8 / codes.size <= 1.01 * math.log2(levels)


@pytest.mark.parametrize("levels", [lv for lv in LEVELS if radix_plan(lv)[1] / radix_plan(lv)[0]
                                    <= 1.01 * math.log2(lv)])
def test_radix_density(levels):
    codes = np.random.default_rng(1).integers(0, levels, 10_000)
    assert pack_radix(codes, levels).nbytes * 8 / codes.size <= 1.01 * math.log2(levels) + 8 * 8 / 10_000


def test_radix_covers_all_widths_up_to_five_bits():
    for key in ALL_KEYS:
        spec = QuantSpec.from_key(key)
        digits, bits = radix_plan(spec.levels)
        if spec.bits <= 5:
            assert bits / digits <= 1.01 * math.log2(spec.levels), key


def test_bell_shaped_codes_cost_less_than_log2_levels():
    weights = np.random.default_rng(2).standard_normal(100_000)
    codes = (np.clip(np.round(weights / 1.2), -1, 1) + 1).astype(np.int32)
    words, counts = entropy.encode(codes, 3)
    bits = words.nbytes * 8 / codes.size
    assert bits < math.log2(3) * 0.985
    assert bits <= entropy.entropy_bits(counts) + 0.001


def test_corrupt_stream_is_detected():
    codes = np.random.default_rng(3).integers(0, 5, 5000).astype(np.int32)
    words, counts = entropy.encode(codes, 5)
    bad = words.copy()
    bad[len(bad) // 2] ^= 0x5A5A5A5A
    with pytest.raises(ValueError):
        entropy.decode(bad, counts)
