"""Rebuild a runnable model from an artifact: the model's own class, low-bit layers in place."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fxpress.errors import ArtifactError
from fxpress.ir.artifact import read_artifact
from fxpress.ir.module_paths import replace_submodule
from fxpress.kernels import entropy
from fxpress.kernels.bypass import Bypass, StreamArg
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear
from fxpress.kernels.packing import unpack_radix
from fxpress.kernels.timestep_table import TimestepTable, install_feeder

TRUSTED_LIBRARIES = ("diffusers.", "transformers.")


def _import(path: str) -> Any:
    module_name, _, qualname = path.partition(":")
    if not module_name.startswith(TRUSTED_LIBRARIES):
        raise ArtifactError(f"refusing to import {path!r} named by an artifact; pass model= to fxpress.load")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def build_skeleton(source: dict[str, Any]) -> nn.Module:
    """Return the model class of `source` built from its config on the meta device (no weights)."""
    library = source.get("library")
    try:
        cls = _import(source["class"])
        with torch.device("meta"):
            if library == "diffusers":
                return cls.from_config(source["config"])
            if library == "transformers":
                config = _import(source["config_class"]).from_dict(source["config"])
                return cls(config)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"cannot rebuild {source.get('class')!r} from the artifact config: {exc}") from exc
    raise ArtifactError(f"the artifact holds a {source.get('class')!r} (a plain nn.Module): pass "
                        "model=<a fresh instance or a factory> to fxpress.load to receive its weights")


def _lowbit(path: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    prefix = f"lowbit::{path}::"
    data = tensors[prefix + "codes"].numpy()
    shape = entry["weight_shape"]
    try:
        if entry.get("codec") == "radix":
            codes = unpack_radix(data, entry["levels"], int(np.prod(shape)))
        elif entry.get("codec") == "rans":
            codes = entropy.decode(data.view(np.uint32), tensors[prefix + "counts"].numpy())
        else:
            raise ValueError(f"unknown codec {entry.get('codec')!r}")
    except (ValueError, RuntimeError, AssertionError, KeyError) as exc:
        raise ArtifactError(f"layer {path!r}: weight codes do not decode: {exc}") from exc
    if codes.size != int(np.prod(shape)) or (codes.size and int(codes.max()) >= entry["levels"]):
        raise ArtifactError(f"layer {path!r}: decoded codes do not fit shape {shape} and {entry['levels']} levels")
    signed = torch.from_numpy(codes.astype(np.int32)).reshape(shape) + entry["qmin"]
    scale, bias = tensors[prefix + "scale"], tensors.pop(f"{path}.bias", None)
    if bias is not None:
        bias = bias.to(getattr(torch, entry.get("bias_dtype", "float32")))
    if entry["kind"] == "linear":
        return LowBitLinear(signed, scale, bias, entry["qmin"], entry["levels"])
    return LowBitConv2d(signed, scale, bias, entry["qmin"], entry["levels"], tuple(entry["stride"]),
                        tuple(entry["padding"]), tuple(entry["dilation"]), entry["groups"])


def _set(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_path) if owner_path else model
    except AttributeError as exc:
        raise ArtifactError(f"artifact tensor {name!r} has no place in the rebuilt model") from exc
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    elif leaf in owner._buffers or isinstance(owner, TimestepTable):
        owner._buffers[leaf] = tensor
    else:
        raise ArtifactError(f"artifact tensor {name!r} is neither a parameter nor a buffer of the model")


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    try:
        replace_submodule(root, path, new)
    except AttributeError as exc:
        raise ArtifactError(f"layer {path!r} of the artifact does not exist in the rebuilt model") from exc


def _apply_bypasses(model: nn.Module, structure: dict[str, Any]) -> None:
    """Replace the blocks a pruning pass removed by Bypass modules (before the tensors are placed)."""
    for path, stream in (structure.get("bypass") or {}).items():
        if not isinstance(stream, dict):
            raise ArtifactError(f"pruned block {path!r}: malformed bypass record {stream!r}")
        _replace(model, path, Bypass(StreamArg.from_json(stream), path))


def _apply_attributes(model: nn.Module, structure: dict[str, Any]) -> None:
    """Set the size attributes a pruning pass changed (heads, features, groups); only existing int attributes."""
    for path, attrs in (structure.get("attributes") or {}).items():
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError as exc:
            raise ArtifactError(f"pruned module {path!r} does not exist in the rebuilt model") from exc
        if isinstance(module, (LowBitLinear, LowBitConv2d)):
            continue  # a low-bit layer's sizes come from its codes
        for attr, value in attrs.items():
            old = getattr(module, attr, None)
            ints = isinstance(value, int) or isinstance(value, list) and all(isinstance(v, int) for v in value)
            if not isinstance(old, (int, tuple, list)) or isinstance(old, bool) or not ints:
                raise ArtifactError(f"pruned module {path!r}: refusing to set {attr!r} to {value!r}")
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)


def load(directory: str | Path, model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Return the runnable compressed model stored in `directory` (eval mode, on the CPU).

    diffusers and transformers models come back as their own class rebuilt from the stored config;
    other models need `model` (an instance or a factory) to receive the weights. Raises ArtifactError
    on a missing, corrupt, truncated or tampered artifact.
    """
    start = time.perf_counter()
    manifest, tensors = read_artifact(directory)
    if model is None:
        skeleton = build_skeleton(manifest.get("source") or {})
    else:
        skeleton = model() if callable(model) and not isinstance(model, nn.Module) else model
    structure = manifest.get("structure") or {}
    _apply_bypasses(skeleton, structure)
    dtypes = manifest.get("dtypes", {})
    decode_start = time.perf_counter()
    for path, entry in manifest.get("lowbit_layers", {}).items():
        if f"{path}.bias" in tensors:
            entry = {**entry, "bias_dtype": dtypes.get(f"{path}.bias", "float32")}
        _replace(skeleton, path, _lowbit(path, entry, tensors))
    decode_seconds = time.perf_counter() - decode_start
    time_cache = manifest.get("time_cache")
    for path in (time_cache or {}).get("modules", []):
        _replace(skeleton, path, TimestepTable(torch.zeros(1), torch.zeros(1)))
    for name, tensor in tensors.items():
        if name.startswith("lowbit::"):
            continue
        dtype = getattr(torch, dtypes.get(name, str(tensor.dtype).removeprefix("torch.")))
        _set(skeleton, name, tensor.to(dtype))
    left = [n for n, t in [*skeleton.named_parameters(), *skeleton.named_buffers()] if t.is_meta]
    if left:
        raise ArtifactError(f"artifact lacks tensors for {left[:5]} ({len(left)} in all)")
    _apply_attributes(skeleton, structure)
    if time_cache:
        install_feeder(skeleton, time_cache["timestep_input"])
    skeleton.eval()
    skeleton.fxpress_load_seconds = {"total": time.perf_counter() - start, "decode": decode_seconds}
    return skeleton
