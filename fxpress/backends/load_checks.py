"""Checks the loader makes before it puts an artifact's tensors into a model, each an ArtifactError naming the
layer or tensor: a low-bit layer must stand where the model has a layer of its kind and geometry, and
every tensor must fit the parameter or buffer it replaces. An artifact whose checksum passes can still
have been written by hand; these checks are what keeps such a file from loading into a model that
cannot run.

Pruned artifacts (a `structure` record) change sizes, so there only ranks, kernel sizes, strides and
dtype kinds are compared, not whole shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fxpress.errors import ArtifactError

STORAGE_DTYPE = torch.float16  # what torch_save stores a floating tensor as when that is lossless


def _kind(dtype: torch.dtype) -> str:
    return "floating" if dtype.is_floating_point else "bool" if dtype == torch.bool else "integer"


def check_layer_fits(path: str, entry: dict[str, Any], old: nn.Module, pruned: bool) -> None:
    """Raise ArtifactError unless the low-bit layer `entry` can stand in for `old`, the model's module at `path`."""
    expected = nn.Linear if entry["kind"] == "linear" else nn.Conv2d
    if not isinstance(old, expected):
        raise ArtifactError(f"low-bit layer {path!r} is a {entry['kind']} layer, but the model has a "
                            f"{type(old).__name__} there")
    shape, weight = list(entry["weight_shape"]), getattr(old, "weight", None)
    if isinstance(weight, torch.Tensor):
        same = shape == list(weight.shape) if not pruned else shape[2:] == list(weight.shape[2:])
        if not same:
            raise ArtifactError(f"low-bit layer {path!r} has weight shape {shape}, the model's "
                                f"{type(old).__name__} has {list(weight.shape)}")
    if isinstance(old, nn.Conv2d):
        for name in ("stride", "padding", "dilation", "groups"):
            have, want = entry[name], getattr(old, name)
            if (list(want) if isinstance(want, tuple) else want) != have:
                raise ArtifactError(f"low-bit layer {path!r} has {name} {have}, the model's Conv2d has {want}")


def check_lowbit_tensors(path: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Raise ArtifactError unless the codes, symbol counts, scales and bias of low-bit layer `path` are all
    present and of the dtype and shape its manifest entry implies (checked before anything is decoded)."""
    prefix, shape = f"lowbit::{path}::", entry["weight_shape"]
    needed = ("codes", "scale", "counts") if entry["codec"] == "rans" else ("codes", "scale")
    missing = [part for part in needed if prefix + part not in tensors]
    if missing:
        raise ArtifactError(f"low-bit layer {path!r}: the artifact lacks its {', '.join(missing)} tensor(s)")
    codes, scale = tensors[prefix + "codes"], tensors[prefix + "scale"]
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ArtifactError(f"low-bit layer {path!r}: codes must be a 1-D uint8 stream, got {codes.dtype} "
                            f"{list(codes.shape)}")
    cols = 1
    for size in shape[1:]:
        cols *= size
    if not scale.is_floating_point() or scale.dim() not in (1, 2) or scale.shape[0] != shape[0] or (
            scale.dim() == 2 and not 1 <= scale.shape[1] <= cols):
        raise ArtifactError(f"low-bit layer {path!r}: scale {scale.dtype} {list(scale.shape)} does not fit weight "
                            f"shape {shape} (one float per output channel, or per channel and group)")
    if entry["codec"] == "rans":
        counts = tensors[prefix + "counts"]
        if counts.dtype not in (torch.int32, torch.int64) or list(counts.shape) != [entry["levels"]]:
            raise ArtifactError(f"low-bit layer {path!r}: symbol counts {counts.dtype} {list(counts.shape)} "
                                f"do not fit {entry['levels']} levels")
        if bool((counts < 0).any()) or int(counts.sum()) != shape[0] * cols:
            raise ArtifactError(f"low-bit layer {path!r}: symbol counts sum to {int(counts.sum())}, the weight "
                                f"shape {shape} has {shape[0] * cols} codes")
    bias = tensors.get(f"{path}.bias")
    if bias is not None and (not bias.is_floating_point() or list(bias.shape) != [shape[0]]):
        raise ArtifactError(f"low-bit layer {path!r}: bias {bias.dtype} {list(bias.shape)} does not fit "
                            f"{shape[0]} output channels")


def check_tensor_fits(name: str, tensor: torch.Tensor, recorded: str | None, current: torch.Tensor | None,
                      pruned: bool) -> torch.dtype:
    """Return the dtype to give artifact tensor `name`; raise ArtifactError unless it has a recorded dtype
    that could have been stored as `tensor.dtype` and it fits `current`, the parameter or buffer it replaces."""
    if recorded is None:
        raise ArtifactError(f"the manifest records no dtype for tensor {name!r} (its dtypes record lacks it)")
    dtype = getattr(torch, recorded)
    if tensor.dtype != dtype and not (tensor.dtype == STORAGE_DTYPE and dtype.is_floating_point):
        raise ArtifactError(f"tensor {name!r} is stored as {tensor.dtype}, which no writer stores a {dtype} as")
    if current is None:
        return dtype
    if _kind(current.dtype) != _kind(dtype):
        raise ArtifactError(f"tensor {name!r} has dtype {dtype}, the model's {name!r} is {current.dtype}")
    fits = tensor.dim() == current.dim() if pruned else tensor.shape == current.shape
    if not fits:
        raise ArtifactError(f"tensor {name!r} has shape {list(tensor.shape)}, the model's {name!r} has "
                            f"{list(current.shape)}")
    return dtype


def check_module_dtypes(model: nn.Module, skip: tuple[type, ...] = ()) -> None:
    """Raise ArtifactError naming a module whose own floating parameters and buffers do not share one dtype
    (every torch layer computes in one: a float16 weight beside a float32 bias is a damaged dtype record).
    Modules of the `skip` types (low-bit layers: their scales have a dtype of their own) are not checked."""
    for path, module in model.named_modules():
        if isinstance(module, skip):
            continue
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        dtypes = {name: t.dtype for name, t in own if t.is_floating_point()}
        if len(set(dtypes.values())) > 1:
            listed = ", ".join(f"{name} {str(d).removeprefix('torch.')}" for name, d in dtypes.items())
            raise ArtifactError(f"module {path or '<root>'!r} gets tensors of different dtypes from the artifact "
                                f"({listed})")


@contextmanager
def restored_on_failure(model: nn.Module) -> Iterator[None]:
    """Put every module of `model` back as it was if the block raises.

    Loading replaces submodules, parameters, buffers and int attributes and registers hooks, but never
    writes into a tensor, so a shallow copy of each module's attributes (its dicts, sets and lists copied one level)
    restores the model bit for bit.
    """
    saved = [(m, {k: v.copy() if isinstance(v, (dict, set, list)) else v for k, v in vars(m).items()})
             for m in model.modules()]
    try:
        yield
    except BaseException:
        for module, attributes in saved:
            module.__dict__.clear()
            module.__dict__.update(attributes)
        raise
