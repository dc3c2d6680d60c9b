"""Every Triton kernel against the torch reference: all widths, odd shapes, grouped scales, dtypes.

On a machine without a GPU they run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1);
with TRITON_INTERPRET=0 on a GPU machine the same tests run the compiled kernels on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from fxpress.kernels import ops
from fxpress.kernels.kernel_config import KernelConfig, interpreting
from fxpress.kernels.packing import is_output_major, output_major, pack_words, unpack_words

triton_conv = pytest.importorskip("fxpress.kernels.triton_conv")
from fxpress.kernels import triton_dequant, triton_dispatch, triton_gemv, triton_matmul, triton_small_m  # noqa: E402

if interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)

WIDTHS = [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.fixture(autouse=True)
def full_fp32_references(monkeypatch):
    """On a GPU, cuDNN would run the fp32 reference convolutions in TF32; the references must be fp32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _layer(gen, n, k, width, groups):
    """Random packed codes, scales (per-channel or `groups` groups), bias and offset for an (n, k) weight."""
    levels = 2**width
    codes = torch.randint(0, levels, (n, k), generator=gen)
    scale = torch.rand((n, groups) if groups else (n,), generator=gen) + 0.05
    bias = torch.randn(n, generator=gen)
    offset = (levels - 1) // 2
    return pack_words(codes, width).to(DEVICE), scale.to(DEVICE), bias.to(DEVICE), offset


def _close(y, ref, rtol):
    scale = ref.float().abs().max().clamp_min(1e-6)
    err = (y.float() - ref.float()).abs().max() / scale
    assert err <= rtol, f"max error {err:.3g} of the output's range"


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("m, k, n, config", [
    (3, 37, 20, KernelConfig(16, 16, 32, 1)),     # odd K, N not a multiple of the tile
    (17, 100, 70, KernelConfig(16, 32, 64, 3)),   # split-K over an odd number of K tiles
    (1, 250, 33, KernelConfig(16, 32, 16, 2)),    # BLOCK_K below the words' field count: gather path
])
@pytest.mark.parametrize("groups", [0, 4])
def test_matmul_matches_reference(width, m, k, n, config, groups):
    gen = torch.Generator().manual_seed(width * 1000 + m + groups)
    packed, scale, bias, offset = _layer(gen, n, k, width, groups)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    y = triton_matmul.lowbit_matmul(x, packed, scale, bias, width, offset, k, config)
    ref = ops.linear_reference(x, packed, scale, bias, width, offset, k)
    _close(y, ref, 1e-5)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("m, split, groups", [(1, 1, 0), (2, 3, 0), (3, 1, 4), (4, 2, 0)])
def test_gemv_matches_reference(width, m, split, groups):
    gen = torch.Generator().manual_seed(width * 10 + m)
    packed, scale, bias, offset = _layer(gen, 40, 75, width, groups)
    x = torch.randn(m, 75, generator=gen).to(DEVICE)
    for dtype, rtol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        y = triton_gemv.lowbit_gemv(x.to(dtype), packed, scale, bias, width, offset, 75,
                                    KernelConfig(1, 32, 32, split))
        _close(y, ops.linear_reference(x, packed, scale, bias, width, offset, 75), rtol)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("m, k, groups, config", [
    (1, 256, 0, KernelConfig(16, 32, 64, 2)),    # one row, split-K
    (7, 256, 4, KernelConfig(16, 16, 64, 1)),    # groups of 64 = one tile: scaled once per output per tile
    (16, 75, 5, KernelConfig(16, 32, 32, 3)),    # 16 rows, odd K, groups of 15: each weight scaled
])
def test_small_m_matches_reference_in_both_layouts(width, m, k, groups, config):
    gen = torch.Generator().manual_seed(width * 100 + m)
    packed, scale, bias, offset = _layer(gen, 40, k, width, groups)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    ref = ops.linear_reference(x, packed, scale, bias, width, offset, k)
    for words in (packed, output_major(packed)):
        for dtype, rtol in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
            y = triton_small_m.lowbit_small_m(x.to(dtype), words, scale, bias, width, offset, k, config)
            assert y.dtype == dtype and y.shape == (m, 40)
            _close(y, ref, rtol)


def test_small_m_refuses_what_it_cannot_run_and_output_major_keeps_the_codes():
    gen = torch.Generator().manual_seed(3)
    packed, scale, bias, offset = _layer(gen, 8, 70, 3, 0)
    with pytest.raises(ValueError, match="at most 16 rows"):
        triton_small_m.lowbit_small_m(torch.zeros(17, 70, device=DEVICE), packed, scale, bias, 3, offset, 70,
                                      KernelConfig(16, 16, 32))
    with pytest.raises(ValueError, match="block_k"):
        triton_small_m.lowbit_small_m(torch.zeros(2, 70, device=DEVICE), packed, scale, bias, 3, offset, 70,
                                      KernelConfig(16, 16, 16))
    transposed = output_major(packed)
    assert is_output_major(transposed) and not is_output_major(packed) and torch.equal(transposed, packed)
    assert torch.equal(unpack_words(transposed, 3, 70), unpack_words(packed, 3, 70))


@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("width, split", [(1, 1), (3, 2), (8, 1)])
def test_matmul_activation_dtypes(dtype, rtol, width, split):
    """fp16 builds weights by bit tricks (no int-to-float), bf16 and fp32 convert; all accumulate in fp32."""
    gen = torch.Generator().manual_seed(7)
    packed, scale, bias, offset = _layer(gen, 48, 96, width, 0)
    x = torch.randn(5, 96, generator=gen).to(DEVICE)
    y = triton_matmul.lowbit_matmul(x.to(dtype), packed, scale, bias.to(dtype), width, offset, 96,
                                    KernelConfig(16, 32, 32, split))
    assert y.dtype == dtype
    _close(y, ops.linear_reference(x, packed, scale, bias, width, offset, 96), rtol)


@pytest.mark.parametrize("width", [2, 5])
def test_conv_half_precision(width):
    gen = torch.Generator().manual_seed(width)
    packed, scale, bias, offset = _layer(gen, 16, 8 * 9, width, 0)
    x = torch.randn(2, 8, 6, 6, generator=gen).to(DEVICE)
    geometry = ([16, 8, 3, 3], [1, 1], [1, 1], [1, 1])
    y = triton_conv.lowbit_conv2d(x.half(), packed, scale, bias.half(), width, offset, *geometry,
                                  KernelConfig(64, 16, 32))
    _close(y, ops.conv2d_reference(x, packed, scale, bias, width, offset, *geometry, 1), 2e-3)


def test_matmul_without_bias_and_strided_input():
    gen = torch.Generator().manual_seed(3)
    packed, scale, _, offset = _layer(gen, 24, 40, 3, 0)
    x = torch.randn(40, 9, generator=gen).to(DEVICE).t()  # (9, 40), column-major
    y = triton_matmul.lowbit_matmul(x, packed, scale, None, 3, offset, 40, KernelConfig(16, 16, 16))
    _close(y, ops.linear_reference(x, packed, scale, None, 3, offset, 40), 1e-5)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("b, c, h, w, o, kernel, stride, padding, dilation", [
    (2, 5, 7, 6, 9, 3, 1, 1, 1),
    (1, 4, 9, 9, 20, 3, 2, 1, 1),
    (2, 6, 5, 5, 7, 1, 1, 0, 1),
    (1, 3, 8, 8, 5, 3, 1, 2, 2),
])
def test_conv_matches_reference(width, b, c, h, w, o, kernel, stride, padding, dilation):
    gen = torch.Generator().manual_seed(width * 100 + c + o)
    k = c * kernel * kernel
    packed, scale, bias, offset = _layer(gen, o, k, width, 3 if width % 2 else 0)
    x = torch.randn(b, c, h, w, generator=gen).to(DEVICE)
    geometry = ([o, c, kernel, kernel], [stride] * 2, [padding] * 2, [dilation] * 2)
    ref = ops.conv2d_reference(x, packed, scale, bias, width, offset, *geometry, 1)
    for layout in (torch.contiguous_format, torch.channels_last):
        y = triton_conv.lowbit_conv2d(x.to(memory_format=layout), packed, scale, bias, width, offset, *geometry,
                                      KernelConfig(64, 16, 32))
        _close(y, ref, 1e-5)


@pytest.mark.parametrize("width", [1, 3, 8, 12])
@pytest.mark.parametrize("groups", [0, 5])
def test_dequantize_matches_reference(width, groups):
    gen = torch.Generator().manual_seed(width + groups)
    packed, scale, _, offset = _layer(gen, 33, 70, width, groups)
    dense = triton_dequant.dequantize(packed, scale, width, offset, 70, torch.float32, block_k=32, block_n=16)
    assert torch.equal(dense, ops.dequantize(packed, scale, width, offset, 70))


def test_dispatch_handles_batched_inputs_grouped_convs_and_wide_codes():
    """The op implementations reshape N-d inputs and route what the fused kernels skip through dequant."""
    gen = torch.Generator().manual_seed(11)
    packed, scale, bias, offset = _layer(gen, 12, 18, 4, 0)
    x = torch.randn(2, 3, 18, generator=gen).to(DEVICE)
    _close(triton_dispatch.linear(x, packed, scale, bias, 4, offset, 18),
           ops.linear_reference(x, packed, scale, bias, 4, offset, 18), 1e-5)
    wide, wscale, wbias, woffset = _layer(gen, 12, 18, 12, 0)   # 12-bit codes: dequant path
    _close(triton_dispatch.linear(x, wide, wscale, wbias, 12, woffset, 18),
           ops.linear_reference(x, wide, wscale, wbias, 12, woffset, 18), 1e-5)
    gpacked, gscale, gbias, goffset = _layer(gen, 8, 3 * 9, 2, 0)  # groups=2: 6 -> 8 channels
    xi = torch.randn(6, 7, 7, generator=gen).to(DEVICE)                # unbatched input
    args = (gpacked, gscale, gbias, 2, goffset, [8, 3, 3, 3], [1, 1], [1, 1], [1, 1], 2)
    _close(triton_dispatch.conv2d(xi, *args), ops.conv2d_reference(xi, *args), 1e-5)


def test_candidate_lists_per_regime(monkeypatch):
    """Few rows try the GEMV and split-K, many rows lead with dequant + cuBLAS; unfusable work goes to dequant."""
    monkeypatch.setattr(triton_dispatch, "interpreting", lambda: False)
    small = triton_dispatch.linear_candidates(1, 4096, 4096, sms=132, fused=True)
    assert small[0].path == "fused" and {c.path for c in small} == {"fused", "gemv", "small_m"}
    transposed = [c.config for c in small if c.path == "small_m"]
    assert max(-(-4096 // c.block_n) * c.split_k for c in transposed) >= 132  # every multiprocessor streams
    assert "small_m" in {c.path for c in triton_dispatch.linear_candidates(16, 1152, 4608, sms=132, fused=True)}
    assert "small_m" not in {c.path for c in triton_dispatch.linear_candidates(17, 1152, 4608, 132, True)}
    assert "small_m" in {c.path for c in triton_dispatch.conv_candidates(16, 320, 2880, True, sms=132)}
    assert any(c.config.split_k > 1 for c in small) and any(c.config.split_k == 1 for c in small)
    assert triton_dispatch.linear_candidates(4096, 4096, 4096, sms=132, fused=True)[0].path == "dequant"
    assert [c.path for c in triton_dispatch.linear_candidates(8, 64, 64, 132, fused=False)] == ["dequant"]
    assert triton_dispatch.conv_candidates(8192, 320, 2880, fused=True)[0].path == "dequant"


def test_dispatch_runs_the_gemv_choice(monkeypatch):
    from fxpress.kernels.tuning import TUNER, Choice

    gen = torch.Generator().manual_seed(5)
    packed, scale, bias, offset = _layer(gen, 24, 50, 3, 0)
    x = torch.randn(2, 50, generator=gen).to(DEVICE)
    monkeypatch.setattr(triton_dispatch, "linear_candidates",
                        lambda *args: [Choice("gemv", KernelConfig(1, 16, 32, 2))])
    TUNER.forget()
    try:
        y = triton_dispatch.linear(x, packed, scale, bias, 3, offset, 50)
        assert TUNER.last[1].path == "gemv"
    finally:
        TUNER.forget()
    _close(y, ops.linear_reference(x, packed, scale, bias, 3, offset, 50), 1e-5)


def test_dispatch_runs_the_small_m_choice_for_linear_and_conv(monkeypatch):
    from fxpress.kernels.tuning import TUNER, Choice

    gen = torch.Generator().manual_seed(6)
    choice = [Choice("small_m", KernelConfig(16, 16, 32, 2))]
    monkeypatch.setattr(triton_dispatch, "linear_candidates", lambda *args: choice)
    monkeypatch.setattr(triton_dispatch, "conv_candidates", lambda *args: choice)
    packed, scale, bias, offset = _layer(gen, 24, 50, 2, 0)
    x = torch.randn(2, 3, 50, generator=gen).to(DEVICE)
    cw = torch.randint(0, 16, (12, 6 * 9), generator=gen)
    cpacked, cscale = pack_words(cw, 4).to(DEVICE), (torch.rand(12, generator=gen) + 0.1).to(DEVICE)
    small = torch.randn(2, 6, 4, 4, generator=gen).to(DEVICE)  # 3x3, stride 2, pad 1: 2 x 2 x 2 = 8 pixels
    TUNER.forget()
    try:
        y = triton_dispatch.linear(x, packed, scale, bias, 2, offset, 50)
        assert TUNER.last[1].path == "small_m"
        conv = triton_dispatch.conv2d(small, cpacked, cscale, None, 4, 7, [12, 6, 3, 3], [2, 2], [1, 1], [1, 1], 1)
        assert TUNER.last[1].path == "small_m"
    finally:
        TUNER.forget()
    _close(y, ops.linear_reference(x, packed, scale, bias, 2, offset, 50), 1e-5)
    ref = ops.conv2d_reference(small, cpacked, cscale, None, 4, 7, [12, 6, 3, 3], [2, 2], [1, 1], [1, 1], 1)
    assert conv.shape == ref.shape == (2, 12, 2, 2)
    _close(conv, ref, 1e-5)
