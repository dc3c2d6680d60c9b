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


def write_artifact(directory: str | Path, payload: dict[str, Any], tensors: dict[str, torch.Tensor],
                   extra_files: dict[str, bytes] | None = None, overwrite: bool = False) -> Path:
    """Write an artifact directory atomically (a temporary sibling renamed into place) and return it.

    Raises ArtifactError if `directory` exists and `overwrite` is False.
    """
    target = Path(directory)
    if target.exists() and not overwrite:
        raise ArtifactError(f"{target} already exists; pass overwrite=True (or --overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
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
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Return the parsed manifest; raises ArtifactError if missing, unreadable or of another format."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an fxpress artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is corrupt: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an fxpress manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(f"{path} has format version {manifest.get('format_version')}; this fxpress "
                            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    return manifest


def read_artifact(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (manifest, tensors) after checking the tensors file (size and sha256; per tensor in version 1)."""
    manifest = read_manifest(directory)
    path = Path(directory) / TENSORS
    if not path.is_file():
        raise ArtifactError(f"{directory}: {TENSORS} is missing")
    if manifest["format_version"] >= 2:
        _check_tensors_file(path, manifest.get("tensors_file"))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
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
