"""save -> load equality, the model's own class back, and clear errors for damaged artifacts."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import fxpress
from fxpress.errors import ArtifactError
from fxpress.ir.artifact import MANIFEST, TENSORS, read_artifact
from fxpress.ir.graph import output_tensors
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear


def test_load_equals_in_memory_model_exactly(tiny_compressed, tiny_artifact, tiny_unet):
    model, example = tiny_unet
    loaded = fxpress.load(tiny_artifact)
    assert type(loaded) is type(model)
    assert isinstance(loaded.down_blocks[0].resnets[0].conv1, LowBitConv2d)
    assert isinstance(loaded.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, LowBitLinear)
    with torch.no_grad():
        for t in (10, 500, 990):
            kwargs = {**example.kwargs, "timestep": torch.tensor([t, t])}
            a = output_tensors(tiny_compressed.model(**kwargs))[0]
            b = output_tensors(loaded(**kwargs))[0]
            assert torch.equal(a, b)


def test_manifest_records_layers_and_checksums(tiny_artifact):
    manifest = json.loads((tiny_artifact / MANIFEST).read_text())
    assert manifest["format_version"] == 2 and manifest["source"]["library"] == "diffusers"
    layer = manifest["lowbit_layers"]["down_blocks.0.resnets.0.conv1"]
    assert layer["codec"] == "rans" and layer["levels"] in (3, 4, 5, 8, 9, 16, 17, 256)
    assert len(manifest["tensors_file"]["sha256"]) == 64
    assert manifest["tensors_file"]["bytes"] == (tiny_artifact / TENSORS).stat().st_size
    assert (tiny_artifact / "bits_per_layer.png").stat().st_size > 1000


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_tampered_tensor_is_detected(tiny_artifact, tmp_path):
    art = _copy(tiny_artifact, tmp_path)
    data = bytearray((art / TENSORS).read_bytes())
    data[-100] ^= 0xFF
    (art / TENSORS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        fxpress.load(art)


def test_truncated_tensors_file_is_detected(tiny_artifact, tmp_path):
    art = _copy(tiny_artifact, tmp_path)
    data = (art / TENSORS).read_bytes()
    (art / TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        fxpress.load(art)


def test_corrupt_or_missing_manifest(tiny_artifact, tmp_path):
    art = _copy(tiny_artifact, tmp_path)
    (art / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        fxpress.load(art)
    (art / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        fxpress.load(art)
    with pytest.raises(ArtifactError):
        fxpress.load(tmp_path / "nowhere")


def test_manifest_edit_is_detected(tiny_artifact, tmp_path):
    art = _copy(tiny_artifact, tmp_path)
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["tensors_file"]["sha256"] = "0" * 64
    (art / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="sha256"):
        read_artifact(art)
    del manifest["tensors_file"]
    (art / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="lacks the size and sha256"):
        read_artifact(art)


def test_version_1_artifacts_are_still_read_and_checked(tiny_artifact, tmp_path):
    """A version-1 manifest (a dtype, shape and sha256 per tensor) loads; a tampered tensor is still caught."""
    from fxpress.ir.artifact import tensor_sha256

    art = _copy(tiny_artifact, tmp_path)
    manifest = json.loads((art / MANIFEST).read_text())
    _, tensors = read_artifact(art)
    manifest["format_version"] = 1
    del manifest["tensors_file"]
    manifest["tensors"] = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                               "sha256": tensor_sha256(v)} for k, v in tensors.items()}
    (art / MANIFEST).write_text(json.dumps(manifest))
    assert fxpress.load(art) is not None
    name = next(iter(manifest["tensors"]))
    manifest["tensors"][name]["sha256"] = "0" * 64
    (art / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"tensor '{name}'.*sha256"):
        read_artifact(art)


def test_untrusted_class_is_not_imported(tiny_artifact, tmp_path):
    art = _copy(tiny_artifact, tmp_path)
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["source"]["class"] = "os:system"
    (art / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="refusing to import"):
        fxpress.load(art)


def test_existing_directory_is_not_overwritten(tiny_compressed, tiny_artifact):
    before = (tiny_artifact / MANIFEST).read_bytes()
    with pytest.raises(ArtifactError, match="already exists and is not empty"):
        fxpress.save(tiny_compressed, tiny_artifact)
    assert (tiny_artifact / MANIFEST).read_bytes() == before


def test_save_into_an_existing_empty_folder(tiny_compressed, tiny_unet):
    """What users write, as with save_pretrained: a TemporaryDirectory exists and is empty."""
    with tempfile.TemporaryDirectory() as d:
        fxpress.save(tiny_compressed, d)
        assert (Path(d) / MANIFEST).is_file()
        _, example = tiny_unet
        assert fxpress.load(d)(**example.kwargs)[0].shape == example.kwargs["sample"].shape
        assert [p.name for p in Path(d).parent.iterdir() if p.name.startswith(f".{Path(d).name}.")] == []


def test_a_non_artifact_folder_is_never_replaced(tiny_compressed, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ArtifactError, match="not empty"):
            fxpress.save(tiny_compressed, tmp_path, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(ArtifactError, match="not a directory"):
        fxpress.save(tiny_compressed, tmp_path / "notes.txt")


def _failing(exc: BaseException, after_bytes: int = 1000):
    """A safetensors writer that writes part of the file, then fails (full disk, interrupt)."""
    def write(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * after_bytes)
        raise exc
    return write


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupt"])
@pytest.mark.parametrize("where", ["new", "empty", "overwrite"])
def test_failed_save_leaves_nothing(tiny_compressed, tiny_artifact, tmp_path, monkeypatch, exc, where):
    import fxpress.ir.artifact as artifact

    target = tmp_path / "out"
    if where == "empty":
        target.mkdir()
    elif where == "overwrite":
        shutil.copytree(tiny_artifact, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()} if target.exists() else None
    monkeypatch.setattr(artifact, "save_file", _failing(exc))
    expected = ArtifactError if isinstance(exc, OSError) else KeyboardInterrupt
    with pytest.raises(expected, match="No space left" if expected is ArtifactError else None):
        fxpress.save(tiny_compressed, target, overwrite=where == "overwrite")
    assert [p.name for p in tmp_path.iterdir()] == ([] if where == "new" else ["out"])
    if before is not None:
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_failed_swap_restores_the_old_artifact(tiny_compressed, tiny_artifact, tmp_path, monkeypatch):
    """An interrupt between moving the old artifact aside and moving the new one in puts the old one back."""
    target = tmp_path / "out"
    shutil.copytree(tiny_artifact, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_rename = Path.rename

    def rename(self, new):
        if Path(new) == target.resolve() and self.name.startswith(".out.") and not self.name.endswith(".old"):
            raise KeyboardInterrupt
        return real_rename(self, new)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        fxpress.save(tiny_compressed, target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_plain_module_round_trip(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    x = torch.randn(4, 32)
    result = fxpress.compress(net, (x,), "uniform", keep=(), bits=4)
    fxpress.save(result, tmp_path / "seq")
    with pytest.raises(ArtifactError, match="model="):
        fxpress.load(tmp_path / "seq")
    fresh = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    loaded = fxpress.load(tmp_path / "seq", model=fresh)
    assert torch.equal(loaded(x), result.model(x))


def test_time_cached_artifact_round_trip(tiny_unet, tmp_path):
    from fxpress.kernels.timestep_table import TimestepTable

    model, example = tiny_unet
    result = fxpress.compress(model, example, "uniform", bits=4, cache_time_embedding=True)
    assert isinstance(result.model.time_embedding, TimestepTable)
    fxpress.save(result, tmp_path / "cached")
    loaded = fxpress.load(tmp_path / "cached")
    assert isinstance(loaded.time_embedding, TimestepTable)
    with torch.no_grad():
        for t in (0, 333, 999):
            kwargs = {**example.kwargs, "timestep": torch.tensor([t, t])}
            assert torch.equal(output_tensors(loaded(**kwargs))[0], output_tensors(result.model(**kwargs))[0])
