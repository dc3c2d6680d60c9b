"""Rebuild a runnable model from an artifact: the model's own class, low-bit layers in place."""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fxpress.backends.load_checks import (
    check_layer_fits,
    check_lowbit_tensors,
    check_module_dtypes,
    check_tensor_fits,
    restored_on_failure,
)
from fxpress.errors import ArtifactError, ModelError
from fxpress.ir.artifact import read_artifact
from fxpress.ir.module_paths import replace_submodule
from fxpress.kernels import entropy
from fxpress.kernels.bypass import Bypass, StreamArg
from fxpress.kernels.control import (
    ControlledTransformer,
    ControlledUNet,
    build_controlnet,
    takes_control_residuals,
)
from fxpress.kernels.guidance import GuidanceConditioned
from fxpress.kernels.image_adapter import ImageAdapted, ImageCrossAttention
from fxpress.kernels.lora import LoRA
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear
from fxpress.kernels.packing import unpack_radix
from fxpress.kernels.timestep_table import TimestepTable, install_feeder

TRUSTED_LIBRARIES = ("diffusers.", "transformers.")


def _import(path: str, base: str) -> type:
    """Return the class `module:qualname` of a trusted library; it must be a subclass of `base` (module:name)."""
    module_name, _, qualname = path.partition(":")
    if not module_name.startswith(TRUSTED_LIBRARIES) or any(p.startswith("_") for p in qualname.split(".")):
        raise ArtifactError(f"refusing to import {path!r} named by an artifact; pass model= to fxpress.load")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    base_module, _, base_name = base.partition(":")
    if not isinstance(obj, type) or not issubclass(obj, getattr(importlib.import_module(base_module), base_name)):
        raise ArtifactError(f"refusing {path!r} named by an artifact: it is not a {base_name} class")
    return obj


def build_skeleton(source: dict[str, Any]) -> nn.Module:
    """Return the model class of `source` built from its config on the meta device (no weights)."""
    library = source.get("library")
    try:
        with torch.device("meta"):
            if library == "diffusers":
                return _import(source["class"], "diffusers:ModelMixin").from_config(source["config"] or {})
            if library == "transformers":
                config = _import(source["config_class"], "transformers:PretrainedConfig").from_dict(
                    source["config"] or {})
                return _import(source["class"], "transformers:PreTrainedModel")(config)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"cannot rebuild {source.get('class')!r} from the artifact config: {exc}") from exc
    raise ArtifactError(f"the artifact holds a {source.get('class')!r} (a plain nn.Module): pass "
                        "model=<a fresh instance or a factory> to fxpress.load to receive its weights")


def _lowbit(path: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    check_lowbit_tensors(path, entry, tensors)
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


def _set(model: nn.Module, name: str, tensor: torch.Tensor, recorded: str | None, pruned: bool) -> None:
    """Put artifact tensor `name` (stored dtype; `recorded`: the model's dtype) in place of the model's own."""
    owner_path, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_path) if owner_path else model
    except AttributeError as exc:
        raise ArtifactError(f"artifact tensor {name!r} has no place in the rebuilt model") from exc
    if leaf in owner._parameters:
        dtype = check_tensor_fits(name, tensor, recorded, owner._parameters[leaf], pruned)
        tensor = tensor.to(dtype)
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    elif leaf in owner._buffers:
        table = isinstance(owner, TimestepTable)  # a placeholder, sized by the artifact
        owner._buffers[leaf] = tensor.to(check_tensor_fits(name, tensor, recorded, None if table else
                                                           owner._buffers[leaf], pruned))
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


def _model_to_fill(model: nn.Module | Callable[[], nn.Module] | None, manifest: dict[str, Any]) -> nn.Module:
    if model is None:
        return build_skeleton(manifest.get("source") or {})
    skeleton = model() if callable(model) and not isinstance(model, nn.Module) else model
    if not isinstance(skeleton, nn.Module):
        raise ModelError(f"model= must be an nn.Module or a factory returning one, got {type(skeleton).__name__}")
    return skeleton


def _wrapped(skeleton: nn.Module, wrapper: dict[str, Any] | None) -> nn.Module:
    """Return `skeleton` inside the wrapper the artifact records (a guidance input), or as it is."""
    if not wrapper:
        return skeleton
    try:
        skeleton.get_submodule(wrapper["site"])
    except AttributeError as exc:
        raise ArtifactError(f"the artifact adds a guidance input at {wrapper['site']!r}, which the rebuilt "
                            f"{type(skeleton).__name__} does not have") from exc
    with torch.device("meta"):
        return GuidanceConditioned(skeleton, wrapper["site"], wrapper["width"], wrapper["features"], wrapper["scale"])


def _with_branches(skeleton: nn.Module, branches: dict[str, Any] | None) -> nn.Module:
    """Return `skeleton` with the branches the artifact's registry records put back (weights come with the
    tensors): a control branch around it first, then the LoRA wrappers."""
    branches = branches or {}
    for name, entry in branches.items():
        if entry["kind"] not in ("lora", "control", "image_adapter"):
            raise ArtifactError(f"branch {name!r} is of kind {entry['kind']!r}, which this fxpress cannot rebuild")
        if entry["kind"] == "control" and entry.get("blocks"):
            try:
                with torch.device("meta"):
                    skeleton = ControlledTransformer(skeleton, entry["blocks"], entry["count"], entry["embed"],
                                                     entry["width"], entry["input"], entry["scale"],
                                                     entry["sample_input"])
            except (AttributeError, IndexError, TypeError) as exc:
                raise ArtifactError(f"branch {name!r} copies blocks {entry['blocks']!r} and embedding "
                                    f"{entry['embed']!r}, which the rebuilt model lacks: {exc}") from exc
        elif entry["kind"] == "control":
            if not takes_control_residuals(skeleton):
                raise ArtifactError(f"branch {name!r} is a control branch, but the rebuilt "
                                    f"{type(skeleton).__name__} takes no control residuals")
            with torch.device("meta"):
                controlnet = build_controlnet(skeleton, entry["channels"], tuple(entry["embedding_channels"]),
                                              copy_weights=False)
                skeleton = ControlledUNet(skeleton, controlnet, entry["input"], entry["scale"])
        if entry["kind"] == "image_adapter":
            with torch.device("meta"):
                for path in entry["targets"]:
                    replace_submodule(skeleton, path, ImageCrossAttention(_submodule(skeleton, path), entry["width"]))
                skeleton = ImageAdapted(skeleton, entry["features"], entry["tokens"], entry["width"], entry["input"],
                                        entry["scale"], entry.get("image_channels"))
    for name, entry in branches.items():
        if entry["kind"] != "lora":
            continue
        for path in entry["targets"]:
            base = _submodule(skeleton, path)
            try:
                with torch.device("meta"):
                    wrapper = LoRA(base, entry["rank"], entry["alpha"], entry["dropout"], entry["scale"])
            except ValueError as exc:
                raise ArtifactError(f"branch {name!r} wraps {path!r}, which cannot take it: {exc}") from exc
            wrapper.fused = bool(entry["fused"])
            replace_submodule(skeleton, path, wrapper)
    return skeleton


def _submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise ArtifactError(f"layer {path!r} of the artifact does not exist in the rebuilt model") from exc


def _check_timestep_input(model: nn.Module, name: str) -> None:
    params = inspect.signature(model.forward).parameters.values()
    if name not in [p.name for p in params] and not any(p.kind == p.VAR_KEYWORD for p in params):
        raise ArtifactError(f"the artifact caches the time embedding by argument {name!r}, which "
                            f"{type(model).__name__}.forward does not take")


def _fill(skeleton: nn.Module, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> float:
    """Put the artifact's layers and tensors into `skeleton`; return the seconds spent decoding weight codes."""
    structure = manifest.get("structure") or {}
    pruned = bool(structure)
    _apply_bypasses(skeleton, structure)
    dtypes = manifest.get("dtypes") or {}
    lowbit = manifest.get("lowbit_layers") or {}
    stray = sorted({n.split("::")[1] for n in tensors if n.startswith("lowbit::")} - set(lowbit))
    if stray or any(n.startswith("lowbit::") and n.count("::") != 2 for n in tensors):
        raise ArtifactError(f"the artifact holds weight codes of layers its manifest does not list: {stray[:5]}")
    decode_start = time.perf_counter()
    for path, entry in lowbit.items():
        check_layer_fits(path, entry, _submodule(skeleton, path), pruned)
        if f"{path}.bias" in tensors:
            bias_dtype = check_tensor_fits(f"{path}.bias", tensors[f"{path}.bias"], dtypes.get(f"{path}.bias"),
                                           None, pruned)
            entry = {**entry, "bias_dtype": str(bias_dtype).removeprefix("torch.")}
        _replace(skeleton, path, _lowbit(path, entry, tensors))
    decode_seconds = time.perf_counter() - decode_start
    time_cache = manifest.get("time_cache")
    if time_cache:
        _check_timestep_input(skeleton, time_cache["timestep_input"])
    for path in (time_cache or {}).get("modules", []):
        _replace(skeleton, path, TimestepTable(torch.zeros(1), torch.zeros(1)))
    placed = set()
    for name, tensor in tensors.items():
        if not name.startswith("lowbit::"):
            _set(skeleton, name, tensor, dtypes.get(name), pruned)
            placed.add(name)
    lowbit_types = (LowBitLinear, LowBitConv2d)
    left = [n for n, _ in [*skeleton.named_parameters(remove_duplicate=False),
                           *skeleton.named_buffers(remove_duplicate=False)]
            if n not in placed and not isinstance(_submodule(skeleton, n.rpartition(".")[0]), lowbit_types)]
    if left:
        raise ArtifactError(f"artifact lacks tensors for {left[:5]} ({len(left)} in all)")
    check_module_dtypes(skeleton, skip=lowbit_types)
    _apply_attributes(skeleton, structure)
    if time_cache:
        install_feeder(skeleton, time_cache["timestep_input"])
    return decode_seconds


def load(directory: str | Path, model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Return the runnable compressed model stored in `directory` (eval mode, on the CPU).

    diffusers and transformers models come back as their own class rebuilt from the stored config;
    other models need `model` (an instance or a factory) to receive the weights; an instance is filled
    in place, and left as it was if loading fails. Raises ArtifactError on a missing, corrupt, truncated
    or tampered artifact, or one that does not fit `model`; ModelError if `model` is not a module.
    """
    start = time.perf_counter()
    manifest, tensors = read_artifact(directory)
    skeleton = _wrapped(_model_to_fill(model, manifest), manifest.get("wrapper"))
    with restored_on_failure(skeleton) if isinstance(model, nn.Module) else nullcontext():
        skeleton = _with_branches(skeleton, manifest.get("branches"))
        decode_seconds = _fill(skeleton, manifest, tensors)
    skeleton.eval()
    if manifest.get("branches"):
        skeleton.fxpress_branches = manifest["branches"]  # adapters and branches (set_branch_scale, strip, fuse)
    if manifest.get("sampler"):
        skeleton.fxpress_sampler = manifest["sampler"]  # the sampler a distilled model was trained for
    skeleton.fxpress_load_seconds = {"total": time.perf_counter() - start, "decode": decode_seconds}
    return skeleton
