"""ExecuTorch export: XNNPACK takes the low-bit layers it can, the .pte runs in ExecuTorch's runtime."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxpress import cli
from fxpress.errors import LoweringError
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear

pytest.importorskip("executorch")
pytestmark = pytest.mark.mobile
executorch_backend = pytest.importorskip("fxpress.backends.executorch")


class Block(nn.Module):
    """conv -> tokens -> LayerNorm -> GEGLU-style gated linear -> image -> grouped conv -> conv."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def conv(codes_range, out, inp, groups=1):
            lo, hi = codes_range
            codes = torch.randint(lo, hi + 1, (out, inp // groups, 3, 3), generator=gen)
            return LowBitConv2d(codes, torch.rand(out, generator=gen) * 0.05 + 0.01, torch.randn(out, generator=gen),
                                lo, hi - lo + 1, (1, 1), (1, 1), (1, 1), groups)

        self.conv_in = conv((-1, 1), 8, 4)                      # 3 levels
        self.norm = nn.LayerNorm(8)
        self.proj = LowBitLinear(torch.randint(-2, 2, (16, 8), generator=gen), torch.rand(16, generator=gen) * 0.2,
                                 None, -2, 4)                   # 4 levels: int4 in XNNPACK
        self.wide = LowBitLinear(torch.randint(-40, 41, (8, 8), generator=gen),
                                 torch.rand(8, generator=gen) * 0.01, torch.randn(8, generator=gen), -40, 81)
        self.depthwise = conv((-1, 1), 8, 8, groups=8)          # XNNPACK: no dynamic quant for groups > 1
        self.conv_out = conv((-3, 3), 4, 8)

    def forward(self, x):
        h = self.conv_in(x)
        b, c, hh, ww = h.shape
        value, gate = self.proj(self.norm(h.flatten(2).transpose(1, 2))).chunk(2, dim=-1)
        tokens = self.wide(value * F.gelu(gate))
        h = tokens.transpose(1, 2).reshape(b, c, hh, ww)
        return self.conv_out(self.depthwise(h))


@pytest.fixture(scope="module")
def block():
    model = Block().eval()
    return model, (torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1)),)


def test_lowbit_layers_take_xnnpack_storage_and_the_program_runs(block, tmp_path):
    model, example = block
    report = executorch_backend.export_executorch(model, example, tmp_path / "block.pte")
    stored = {layer.module: (layer.stored_as, layer.reason) for layer in report.layers}
    assert stored["conv_in"] == ("int8 (qc8w)", "") and stored["conv_out"] == ("int8 (qc8w)", "")
    assert stored["proj"] == ("int4 (qc4w)", "") and stored["wide"] == ("int8 (qc8w)", "")
    assert stored["depthwise"][0] == "fp32" and "groups=8" in stored["depthwise"][1]
    assert report.delegated_calls >= 1 and report.path.stat().st_size == report.file_bytes
    assert not list(tmp_path.glob("*.tmp"))
    # XNNPACK quantizes activations to int8 on the fly: close to, not equal to, the torch backend
    assert executorch_backend.compare_with_executorch(model, example, report.path) < 3e-2


def test_float_weights_compute_what_the_torch_backend_computes(block, tmp_path):
    model, example = block
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = executorch_backend.export_executorch(model, example, tmp_path / "float.pte", weights="float")
    assert {layer.stored_as for layer in report.layers} == {"fp32"}
    assert executorch_backend.compare_with_executorch(model, example, report.path) < 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the user's model untouched
    assert all(isinstance(m, (LowBitLinear, LowBitConv2d)) for n, m in model.named_children() if n != "norm")


def test_tiny_unet_artifact_exports_from_the_cli_and_matches(tiny_artifact, tmp_path, capsys):
    import fxpress
    from fxpress.ir.artifact import read_manifest
    from fxpress.ir.input_spec import inputs_from_spec

    out = tmp_path / "tiny.pte"
    assert cli.main(["export", str(tiny_artifact), "--to", "executorch", "--weights", "float",
                     "--out", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "ExecuTorch runtime vs torch backend" in printed and "x the fxpress artifact" in printed
    example = inputs_from_spec(read_manifest(tiny_artifact)["inputs"])
    assert executorch_backend.compare_with_executorch(fxpress.load(tiny_artifact), example, out) < 1e-3


def test_tiny_unet_lowbit_program_lowers_and_runs(tiny_artifact, tmp_path):
    """The UNet's transformer blocks feed 1x1 convs through a GEGLU split: the case XnnpackConv2d's cat is for."""
    import fxpress
    from fxpress.ir.artifact import read_manifest
    from fxpress.ir.input_spec import inputs_from_spec

    model = fxpress.load(tiny_artifact)
    example = inputs_from_spec(read_manifest(tiny_artifact)["inputs"])
    report = executorch_backend.export_executorch(model, example, tmp_path / "tiny-lowbit.pte")
    assert {layer.stored_as for layer in report.layers} <= {"int4 (qc4w)", "int8 (qc8w)"}
    assert executorch_backend.compare_with_executorch(model, example, report.path) < 5e-2


def test_an_op_without_a_kernel_is_named_and_nothing_is_written(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Linear(4, 4))

        def forward(self, x):
            return torch.special.erfinv(self.head(x).tanh() * 0.5)

    target = tmp_path / "odd.pte"
    refused = r"(?s)could not lower Odd \(node 'special_erfinv', module '<top level>'\).*erfinv"
    with pytest.raises(LoweringError, match=refused):
        executorch_backend.export_executorch(Odd(), (torch.randn(2, 4),), target)
    assert list(tmp_path.iterdir()) == []


def test_uncapturable_model_and_bad_mode_are_typed_errors(tmp_path):
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(LoweringError, match="could not capture Branchy"):
        executorch_backend.export_executorch(Branchy(), (torch.randn(3),), tmp_path / "b.pte")
    with pytest.raises(LoweringError, match="weights must be one of"):
        executorch_backend.export_executorch(Branchy(), (torch.randn(3),), tmp_path / "b.pte", weights="int3")
    assert list(tmp_path.iterdir()) == []
