"""The artifact format: a directory with `manifest.json` and `tensors.safetensors`, written atomically.

The manifest holds the format version, the payload a backend needs to rebuild the model, and the
size and sha256 of the tensors file. Reading checks all of it; nothing is ever unpickled.

Version 2 checks the tensors file as one sha256 (64 bytes of manifest); version 1 kept a dtype,
shape and sha256 per tensor, about 150 bytes per tensor, a tenth of a small model's 2-bit artifact.
Both are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fxpress.errors import ArtifactError
from fxpress.ir.manifest_schema import check_manifest

FORMAT = "fxpress-artifact"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Return the sha256 of a tensor's raw bytes (contiguous, native byte order)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def file_sha256(path: Path) -> str:
    """Return the sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(directory: str | Path, overwrite: bool = False) -> bool:
    """Return whether `directory` holds an artifact to replace; raise ArtifactError where writing would lose data."""
    target = Path(directory).resolve()
    if not target.exists():
        return False
    if not target.is_dir():
        raise ArtifactError(f"{target} exists and is not a directory; choose another path for the artifact")
    if not any(target.iterdir()):
        return False  # an empty folder (e.g. a TemporaryDirectory) is written into
    if not overwrite:
        raise ArtifactError(f"{target} already exists and is not empty; pass overwrite=True (or --overwrite) "
                            "to replace it")
    if not (target / MANIFEST).is_file():
        raise ArtifactError(f"{target} is not empty and is not an fxpress artifact (no {MANIFEST}); refusing to "
                            "replace it even with overwrite")
    return True


def write_artifact(directory: str | Path, payload: dict[str, Any], tensors: dict[str, torch.Tensor],
                   extra_files: dict[str, bytes] | None = None, overwrite: bool = False) -> Path:
    """Write an artifact directory atomically (a temporary sibling renamed into place) and return it.

    An existing empty directory is written into. Raises ArtifactError if `directory` is a non-empty
    directory (unless `overwrite` and it is an fxpress artifact) or a file, or if writing fails (full
    disk, permissions); on any failure, interrupts included, nothing new is left and what was there stays.
    """
    target = Path(directory).resolve()
    replace_old = check_writable(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise ArtifactError(f"cannot write an artifact at {target}: {exc}") from exc
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp / TENSORS))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, **payload,
            "tensors_file": {"count": len(tensors), "bytes": (tmp / TENSORS).stat().st_size,
                             "sha256": file_sha256(tmp / TENSORS)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, separators=(",", ":")))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _move_into_place(tmp, target, replace_old)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"cannot write the artifact {target}: {exc}; nothing was written") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _move_into_place(tmp: Path, target: Path, replace_old: bool) -> None:
    """Rename `tmp` to `target` (an empty directory is replaced); an old artifact is swapped out and back on failure."""
    if not replace_old:
        tmp.rename(target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _member(directory: str | Path, name: str) -> Path:
    """Return the path of file `name` of an artifact; raises ArtifactError if it lies outside the folder (a link)."""
    root = Path(directory).resolve()
    path = root / name
    if path.is_symlink() and not path.resolve().is_relative_to(root):
        raise ArtifactError(f"{path} points outside its artifact folder (to {path.resolve()}); refusing to read it")
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Return the parsed manifest with every field checked (manifest_schema); raises ArtifactError if it is
    missing, unreadable, of another format or version, or has a field no fxpress writer produces."""
    path = _member(directory, MANIFEST)
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an fxpress artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, a 5,000-digit int
        raise ArtifactError(f"{path} is corrupt: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an fxpress manifest (no \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ArtifactError(f"{path} has format version {json.dumps(version)[:40]}; this fxpress "
                            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    check_manifest(manifest, path)
    return manifest


def read_artifact(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (manifest, tensors) after checking the tensors file (size and sha256; per tensor in version 1)."""
    manifest = read_manifest(directory)
    path = _member(directory, TENSORS)
    if not path.is_file():
        raise ArtifactError(f"{directory}: {TENSORS} is missing")
    if manifest["format_version"] >= 2:
        _check_tensors_file(path, manifest["tensors_file"])
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ArtifactError(f"{path} is truncated or corrupt: {exc}") from exc
    if manifest["format_version"] == 1:
        _check_tensors_v1(path, manifest.get("tensors", {}), tensors)
    return manifest, tensors


def _check_tensors_file(path: Path, info: Any) -> None:
    if not isinstance(info, dict) or not {"bytes", "sha256"} <= set(info):
        raise ArtifactError(f"{path.parent / MANIFEST} lacks the size and sha256 of {TENSORS}")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise ArtifactError(f"{path} is truncated or corrupt: {size:,} bytes, the manifest says {info['bytes']:,}")
    if file_sha256(path) != info["sha256"]:
        raise ArtifactError(f"{path} fails its sha256 check: the artifact was modified or damaged")


def _check_tensors_v1(path: Path, expected: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ArtifactError(f"{path} does not match its manifest (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, info in expected.items():
        tensor = tensors[name]
        if str(tensor.dtype).removeprefix("torch.") != info["dtype"] or list(tensor.shape) != info["shape"]:
            raise ArtifactError(f"tensor {name!r} in {path} has dtype/shape {tensor.dtype}/{list(tensor.shape)}, "
                                f"manifest says {info['dtype']}/{info['shape']}")
        if tensor_sha256(tensor) != info["sha256"]:
            raise ArtifactError(f"tensor {name!r} in {path} fails its sha256 check: the artifact was "
                                "modified or damaged")


def artifact_bytes(directory: str | Path) -> int:
    """Return the total size of every file in the artifact directory."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
