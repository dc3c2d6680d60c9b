"""ONNX export: low-bit layers become DequantizeLinear + MatMul/Conv, and ONNX Runtime computes the same."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fxpress import cli
from fxpress.backends import onnx as onnx_backend
from fxpress.errors import ArtifactError, LoweringError
from fxpress.ir.artifact import read_manifest
from fxpress.ir.input_spec import inputs_from_spec
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_artifact, tiny_unet, tmp_path_factory):
    import fxpress

    _, example = tiny_unet
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    model = fxpress.load(tiny_artifact)
    return model, example, onnx_backend.export_onnx(model, example, path)


def test_tiny_unet_exports_with_standard_ops_and_matches_in_onnxruntime(tiny_onnx, tiny_artifact):
    model, example, report = tiny_onnx
    proto = onnx.load(report.path)
    onnx.checker.check_model(proto)
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    assert not any(domain == onnx_backend.DOMAIN for domain, _ in ops)
    assert ("", "DequantizeLinear") in ops and {o.domain for o in proto.opset_import} == {""}
    lowbit = read_manifest(tiny_artifact)["lowbit_layers"]
    assert sorted(layer.module for layer in report.layers) == sorted(lowbit)
    stored = {layer.module: layer.stored_as for layer in report.layers}
    rank = {"INT2": 0, "INT4": 1, "INT8": 2}
    for path, entry in lowbit.items():    # at most: 3-4 levels INT2 (opset 25); 5-16 INT4; 17 INT8
        widest = "INT2" if entry["levels"] <= 4 else "INT4" if entry["levels"] <= 16 else "INT8"
        assert rank[stored[path]] <= rank[widest]
    assert report.opset == (25 if "INT2" in stored.values() else 21)
    errors = onnx_backend.compare_with_onnxruntime(model, example, report.path)
    assert errors["exact"] < 1e-4            # session.qdq_matmulnbits_accuracy_level=0
    assert errors["default"] < 1e-2          # MatMulNBits with int8 activations


def test_codes_take_the_narrowest_type_and_fp16_weights_stay_fp16(tmp_path):
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        LowBitConv2d(torch.randint(-1, 2, (6, 3, 3, 3), generator=gen), torch.rand(6) + 0.1, torch.randn(6),
                     -1, 3, (1, 1), (1, 1), (1, 1), 1),
        nn.Flatten(),
        LowBitLinear(torch.randint(-8, 9, (5, 6 * 8 * 8), generator=gen), torch.rand(5) + 0.1, None, -8, 17),
        nn.Linear(5, 4096).half().float(),    # exact in fp16: stored as fp16 + Cast
    ).eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own deprecation warnings stay inside the export
        report = onnx_backend.export_onnx(model, (x,), tmp_path / "small.onnx")
    assert [layer.stored_as for layer in report.layers] == ["INT2", "INT8"]   # 3 levels; 17 levels
    assert onnx_backend.export_onnx(model, (x,), tmp_path / "opset21.onnx", int2=False).opset == 21
    proto = onnx.load(report.path)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert onnx_backend.compare_with_onnxruntime(model, (x,), report.path)["exact"] < 1e-5


def test_failed_export_is_a_typed_error_and_leaves_no_file(tmp_path):
    class Uncapturable(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x   # control flow on data: torch.export refuses it

    target = tmp_path / "never.onnx"
    with pytest.raises(LoweringError, match="could not export Uncapturable"):
        onnx_backend.export_onnx(Uncapturable(), (torch.randn(3),), target)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_reads_the_recorded_inputs(tiny_artifact, tmp_path, capsys):
    spec = read_manifest(tiny_artifact)["inputs"]
    drawn = inputs_from_spec(spec)
    assert drawn.kwargs["sample"].shape == (2, 4, 16, 16) and drawn.kwargs["timestep"].dtype == torch.long
    with pytest.raises(ArtifactError, match="names no torch dtype"):
        inputs_from_spec({"args": [{"shape": [2], "dtype": "load"}]})   # a manifest cannot name any attribute
    out = tmp_path / "cli.onnx"
    assert cli.main(["export", str(tiny_artifact), "--to", "onnx", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert cli.main(["export", str(tiny_artifact), "--out", str(out)]) == 2    # exists, no --overwrite


def test_timestep_table_reads_the_timestep_input_in_onnx(tmp_path):
    """A time-cached model exports with its table lookup on the graph input, not a constant of the example."""
    import onnxruntime as ort

    from fxpress.kernels.timestep_table import TimestepTable, install_feeder

    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            steps = torch.arange(0, 1000, 10, dtype=torch.float32)
            self.time_embedding = TimestepTable(steps, torch.stack([steps.sin(), steps.cos()], dim=1))
            self.proj = LowBitLinear(torch.randint(-1, 2, (2, 6)), torch.rand(2) + 0.1, None, -1, 3)

        def forward(self, x, timestep):
            return self.proj(x) + self.time_embedding(x)

    model = Cached().eval()
    install_feeder(model, "timestep")
    x = torch.randn(2, 6)
    report = onnx_backend.export_onnx(model, (x, torch.tensor([500, 500])), tmp_path / "cached.onnx")
    session = ort.InferenceSession(str(report.path))
    names = [i.name for i in session.get_inputs()]
    for steps in ([500, 500], [0, 990]):
        t = torch.tensor(steps)
        with torch.no_grad():
            expected = model(x, t).numpy()
        got = session.run(None, dict(zip(names, [x.numpy(), t.numpy()], strict=True)))[0]
        assert abs(got - expected).max() < 1e-5, steps
