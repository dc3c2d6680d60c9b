"""The low-bit custom ops compute dequant-then-op exactly, and a quantized model still exports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear


@pytest.mark.parametrize("qmin, levels", [(-1, 3), (-2, 4), (-2, 5), (-8, 17), (-128, 256), (-128, 257)])
def test_linear_and_conv_match_reference(qmin, levels):
    gen = torch.Generator().manual_seed(levels)
    codes = torch.randint(qmin, qmin + levels, (24, 36), generator=gen)
    scale = torch.rand(24, generator=gen).half() + 0.1
    bias = torch.randn(24, generator=gen)
    x = torch.randn(5, 36, generator=gen)
    weight = codes.float() * scale.float()[:, None]
    layer = LowBitLinear(codes, scale, bias, qmin, levels)
    assert torch.equal(layer.codes(), codes)
    assert torch.allclose(layer(x), F.linear(x, weight, bias), atol=1e-5)
    ccodes = codes.reshape(24, 4, 3, 3)
    conv = LowBitConv2d(ccodes, scale, bias, qmin, levels, (2, 2), (1, 1), (1, 1), 1)
    xi = torch.randn(2, 4, 9, 9, generator=gen)
    ref = F.conv2d(xi, weight.reshape(24, 4, 3, 3), bias, 2, 1)
    assert torch.allclose(conv(xi), ref, atol=1e-5)


def test_quantized_model_exports_with_fxpress_ops(tiny_compressed, tiny_unet):
    _, example = tiny_unet
    program = torch.export.export(tiny_compressed.model, (), example.kwargs, strict=False)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "fxpress.lowbit_linear.default" in targets and "fxpress.lowbit_conv2d.default" in targets
    with torch.no_grad():
        out = program.module()(**example.kwargs)[0]
        ref = tiny_compressed.model(**example.kwargs)[0]
    assert torch.allclose(out, ref, atol=1e-5)
