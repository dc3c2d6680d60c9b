"""Core ML export: each low-bit layer is palettized at fxpress's width, read back from the mlpackage."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from fxpress import cli
from fxpress.errors import LoweringError
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear
from fxpress.kernels.packing import field_width

pytest.importorskip("coremltools")
pytestmark = pytest.mark.mobile
coreml_backend = pytest.importorskip("fxpress.backends.coreml")


def _mixed_model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)

    def linear(levels: int, rows: int, cols: int, scale_groups: int = 0) -> LowBitLinear:
        qmin = -(levels // 2)
        codes = torch.randint(qmin, qmin + levels, (rows, cols), generator=gen)
        codes[:, 0], codes[:, 1] = qmin, qmin + levels - 1          # every level used
        shape = (rows, scale_groups) if scale_groups else (rows,)
        return LowBitLinear(codes, torch.rand(shape, generator=gen) * 0.1 + 0.01, None, qmin, levels)

    conv_codes = torch.randint(-1, 2, (6, 3, 3, 3), generator=gen)
    return nn.Sequential(
        LowBitConv2d(conv_codes, torch.rand(6, generator=gen) + 0.1, torch.randn(6, generator=gen), -1, 3,
                     (1, 1), (1, 1), (1, 1), 1),                    # 3 levels: 2 bits
        nn.Flatten(),
        linear(17, 24, 6 * 8 * 8),                                  # 5 bits: no 5-bit palette, takes 6
        linear(8, 24, 24),                                          # 3 bits
        linear(600, 16, 24),                                        # 10 bits: stays fp16
        linear(4, 8, 16, scale_groups=2),                           # group-wise scales: stays fp16
    ).eval()


def test_widths_follow_fxpress_and_read_back(tmp_path):
    model = _mixed_model()
    report = coreml_backend.export_coreml(model, (torch.randn(2, 3, 8, 8),), tmp_path / "mixed.mlpackage")
    stored = [(layer.width, layer.stored_as, bool(layer.reason)) for layer in report.layers]
    assert stored == [(2, "LUT uint2 per channel", False), (5, "LUT uint6 per channel", False),
                      (3, "LUT uint3 per channel", False), (10, "fp16", True), (2, "fp16", True)]
    assert coreml_backend.read_palettization(report.path) == {"0": 2, "2": 6, "3": 3}
    assert report.max_weight_error < 1e-3                 # fp16 tables: code x scale rounded to fp16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_float32_tables_hold_the_weights_exactly(tmp_path):
    model = _mixed_model()
    report = coreml_backend.export_coreml(model, (torch.randn(2, 3, 8, 8),), tmp_path / "fp32.mlpackage",
                                          precision="float32")
    assert report.max_weight_error < 1e-6 and report.precision == "float32"
    if sys.platform == "darwin":    # predictions need the Core ML runtime
        import coremltools as ct

        x = torch.randn(2, 3, 8, 8)
        out = next(iter(ct.models.MLModel(str(report.path)).predict({"x": x.numpy()}).values()))
        with torch.no_grad():
            expected = model(x)
        assert (torch.from_numpy(out) - expected).norm() / expected.norm() < 1e-3


def test_tiny_unet_package_from_the_cli_has_each_layer_at_its_assigned_width(tiny_artifact, tmp_path, capsys):
    from fxpress.ir.artifact import read_manifest

    out = tmp_path / "tiny.mlpackage"
    assert cli.main(["export", str(tiny_artifact), "--to", "coreml", "--out", str(out), "--check"]) == 0
    assert "at their planned widths" in capsys.readouterr().out
    lowbit = read_manifest(tiny_artifact)["lowbit_layers"]
    assigned = {path: field_width(entry["levels"]) for path, entry in lowbit.items()}
    read_back = coreml_backend.read_palettization(out)
    assert read_back == {path: coreml_backend.palette_bits(width) for path, width in assigned.items()}
    assert cli.main(["export", str(tiny_artifact), "--to", "coreml", "--out", str(out)]) == 2   # exists


def test_aliases_from_export_do_not_stop_conversion(tmp_path):
    """torch.export leaves aten.alias nodes (CLIPTextModel has them); coremltools knows no such op."""
    class Aliasing(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = LowBitLinear(torch.randint(-1, 2, (4, 4)), torch.rand(4) + 0.1, None, -1, 3)

        def forward(self, x):
            return self.proj(torch.ops.aten.alias(x))

    report = coreml_backend.export_coreml(Aliasing(), (torch.randn(2, 4),), tmp_path / "alias.mlpackage")
    assert coreml_backend.read_palettization(report.path) == {"proj": 2}


def test_refused_op_is_named_and_nothing_is_written(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return torch.special.erfinv(self.inner(x).tanh() * 0.5)

    with pytest.raises(LoweringError, match=r"could not convert Odd \(node 'special_erfinv'"):
        coreml_backend.export_coreml(Odd(), (torch.randn(2, 4),), tmp_path / "odd.mlpackage")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "broken.mlpackage").mkdir()
    with pytest.raises(LoweringError, match="not a readable mlpackage"):
        coreml_backend.read_palettization(tmp_path / "broken.mlpackage")
