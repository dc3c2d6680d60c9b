"""`backends.triton.lower`: a loaded artifact runs on the Triton kernels and matches the torch backend."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxpress
from fxpress.errors import LoweringError, LoweringWarning
from fxpress.kernels.kernel_config import KernelConfig, interpreting
from fxpress.kernels.lowbit_layers import LowBitLinear

triton_backend = pytest.importorskip("fxpress.backends.triton")
from fxpress.kernels import tuning  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
needs_kernels = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                   reason="Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _counting_dispatcher(monkeypatch):
    """Count calls of the Triton dispatcher (the triton ops look it up at each call)."""
    from fxpress.kernels import triton_dispatch

    calls = {"linear": 0, "conv2d": 0}
    for name in calls:
        real = getattr(triton_dispatch, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(triton_dispatch, name, counted)
    return calls


@needs_kernels
def test_lowered_tiny_artifact_matches_torch_backend(tiny_artifact, tiny_unet, monkeypatch):
    """Acceptance: the 1.99-bit tiny-unet artifact gives the torch backend's output within 1e-3, and lowering
    one model changes the kernels of that model only: a reference model in the same process keeps the torch ops."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32 on the GPU too
    calls = _counting_dispatcher(monkeypatch)
    _, example = tiny_unet
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in example.kwargs.items()}
    with torch.no_grad():
        reference_model = fxpress.load(tiny_artifact).to(DEVICE)
        lowered = triton_backend.lower(tiny_artifact, device=DEVICE)
        assert {m.kernels for m in lowered.modules() if hasattr(m, "packed")} == {"triton"}
        assert {m.kernels for m in reference_model.modules() if hasattr(m, "packed")} == {"reference"}
        reference = reference_model(**kwargs)[0]
        assert calls == {"linear": 0, "conv2d": 0}   # lowering the other model changed nothing here
        out = lowered(**kwargs)[0]
        assert calls["linear"] > 0 and calls["conv2d"] > 0
        ran = dict(calls)
        assert torch.equal(reference_model(**kwargs)[0], reference) and calls == ran
    assert _rel(out.cpu(), reference.cpu()) < 1e-3
    triton_backend.unlower(lowered)
    with torch.no_grad():
        assert torch.equal(lowered(**kwargs)[0], reference) and calls == ran


@needs_kernels
def test_unsupported_layer_warns_by_name_and_keeps_reference():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(LowBitLinear(torch.randint(-1, 2, (6, 10), generator=gen), torch.rand(6), None, -1, 3),
                          LowBitLinear(torch.randint(-2, 2, (4, 6), generator=gen), torch.rand(4), None, -2, 4))
    model[1].packed = model[1].packed.to(torch.int64)  # not the int32 word layout the kernels read
    x = torch.randn(3, 10, generator=gen)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(LoweringWarning, match="layer '1' keeps the torch reference path"):
        triton_backend.lower(model, device=DEVICE)
    assert model[0].fallback is None and model[1].fallback
    assert model[0].kernels == "triton" and model[1].kernels == "reference"
    with torch.no_grad():
        assert torch.allclose(model(x.to(DEVICE)).cpu(), expected, atol=1e-5)


@needs_kernels
def test_output_major_layout_is_stored_once_at_lowering_and_runs_the_small_m_kernel(monkeypatch):
    from fxpress.kernels import triton_dispatch
    from fxpress.kernels.packing import is_output_major

    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(LowBitLinear(torch.randint(-2, 2, (24, 64), generator=gen), torch.rand(24), None, -2, 4),
                          LowBitLinear(torch.randint(-1, 2, (8, 24), generator=gen), torch.rand(8), None, -1, 3))
    x = torch.randn(3, 64, generator=gen)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(LoweringError, match="unknown weight layout"):
        triton_backend.lower(model, device=DEVICE, weight_layout="n-major")
    assert model[0].kernels == "reference"
    monkeypatch.setattr(triton_dispatch, "linear_candidates",
                        lambda *args: [tuning.Choice("small_m", KernelConfig(16, 16, 32, 2))])
    tuning.TUNER.forget()
    try:
        triton_backend.lower(model, device=DEVICE, weight_layout="output-major")
        assert all(is_output_major(m.packed) for m in model)
        with torch.no_grad():
            out = model(x.to(DEVICE))
        assert tuning.TUNER.last[1].path == "small_m"
    finally:
        tuning.TUNER.forget()
    assert torch.allclose(out.cpu(), expected, atol=1e-5)
    triton_backend.unlower(model)
    assert all(m.packed.is_contiguous() for m in model)


def test_lower_refuses_impossible_targets_before_touching_the_model():
    plain = nn.Linear(4, 4)
    if not torch.cuda.is_available():
        with pytest.raises(LoweringError, match="CUDA GPU"):
            triton_backend.lower(plain, device="cuda")
    with pytest.raises(LoweringError, match="not 'meta'"):
        triton_backend.lower(plain, device="meta")
    if interpreting():
        with pytest.raises(LoweringError, match="no low-bit layers"):
            triton_backend.lower(plain, device="cpu")
    with pytest.raises(LoweringError, match="artifact directory"):
        triton_backend.lower(42, device=DEVICE if torch.cuda.is_available() or interpreting() else "cpu")
    assert plain.weight.device.type == "cpu"


def test_tuner_keeps_the_fastest_choice_and_remembers_it(tmp_path, monkeypatch):
    fast = tuning.Choice("fused", KernelConfig(32, 32, 32))
    broken = tuning.Choice("fused", KernelConfig(16, 16, 16))
    times = {tuning.DEQUANT: 2.0, fast: 0.5}

    def fake_gpu_time(fn):
        return fn()

    def run(choice):
        if choice is broken:
            raise RuntimeError("out of shared memory")
        return times[choice]

    monkeypatch.setattr(tuning, "gpu_time_ms", fake_gpu_time)
    monkeypatch.setattr(tuning, "tuning_enabled", lambda: True)
    cache = tmp_path / "tuning.json"
    tuner = tuning.Tuner(cache)
    assert tuner.choose("k", [tuning.DEQUANT, broken, fast], run) == fast
    assert set(tuner.timings["k"]) == {"dequant", "32x32x32/s1/w4/st3"}
    monkeypatch.setattr(tuning, "tuning_enabled", lambda: False)
    assert tuning.Tuner(cache).choose("k", [tuning.DEQUANT], run) == fast       # read back from disk
    assert tuning.Tuner(cache).choose("other", [tuning.DEQUANT, fast], run) == tuning.DEQUANT  # default
    cache.write_text("{not json")
    assert tuning.Tuner(cache).choose("k", [broken], run) == broken            # corrupt cache: start over
    tuner.remember_fast(("k",), fast)
    assert tuner.fast(("k",)) == fast and tuner.last == (("k",), fast)
    tuner.forget()
    assert tuner.fast(("k",)) is None and json.loads(cache.read_text()) == {}
