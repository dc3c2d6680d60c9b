"""Bookkeeping every rewiring pass shares: names, capturing again with annotations carried, scales.

The registry itself and the marking of branch layers and nodes live in `fxpress.ir.branches`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from fxpress.errors import RecipeError
from fxpress.ir.annotations import LayerAnnotation
from fxpress.ir.branches import BRANCH_META, branch_modules, mark_branches, registry
from fxpress.ir.graph import META_KEY, Graph
from fxpress.kernels.lora import LoRA

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_new_name(graph: Graph, name: str, pass_name: str) -> None:
    """Raise RecipeError when `name` is not an identifier or a branch of that name exists."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RecipeError(f"{pass_name}: branch name {name!r} must be an identifier (letters, digits, _)")
    if name in registry(graph):
        raise RecipeError(f"{pass_name}: the model already has a branch named {name!r}; choose another name")


def resolve_names(graph: Graph, names: list[str] | tuple[str, ...], what: str) -> list[str]:
    """Return `names` after checking each is a branch of `graph`; RecipeError names the unknown ones."""
    known = registry(graph)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RecipeError(f"{what}: no branch named {', '.join(map(repr, unknown))}; the model has "
                          f"{', '.join(map(repr, known)) or 'no branches'}")
    return list(names)


def recaptured(graph: Graph, model: nn.Module, renamed: dict[str, str]) -> Graph:
    """Capture `model` (the graph's model after an edit) again on the graph's inputs, carrying over the
    annotations (old layer path → new path through `renamed`), facts, extras and calibration."""
    annotations = graph.annotations()
    new = graph.recapture(model)
    new.provided = set(graph.provided)
    for path, ann in annotations.items():
        target = renamed.get(path, path)
        if target in new.layers:
            for node in new.nodes_of(target):
                node.meta[META_KEY] = ann
    carried = {renamed.get(p, p) for p in annotations}
    for path in new.layers:  # layers that came and went (a branch's) start from a fresh annotation
        if path not in carried:
            for node in new.nodes_of(path):
                node.meta[META_KEY] = LayerAnnotation()
    mark_branches(new)
    return new


PATH_FIELDS = ("targets", "merged", "modules", "wrappers", "scale_modules")


def remap_paths(entry: dict[str, Any], rename) -> None:
    """Move a registry entry's module paths (full paths; an image adapter's targets are relative to the
    model inside it, at `model.`) through `rename` (old full path -> new full path)."""
    for key in PATH_FIELDS:
        if key not in entry:
            continue
        if key == "targets" and entry["kind"] == "image_adapter":
            entry[key] = [rename(f"model.{p}").removeprefix("model.") for p in entry[key]]
        else:
            entry[key] = [rename(p) for p in entry[key]]


def lora_modules(model: nn.Module, entry: dict[str, Any]) -> list[LoRA]:
    """The LoRA wrappers a registry entry names, found in `model`."""
    return [model.get_submodule(t) for t in entry["targets"]]


def set_branch_scale(target: Graph | nn.Module, name: str, scale: float) -> None:
    """Set branch `name`'s output scale in place, without capturing again (the scale is a buffer the
    captured graph reads). `target` is a Graph or a model loaded from an artifact."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise RecipeError(f"branch scale must be a finite number, got {scale!r}")
    entries = registry(target) if isinstance(target, Graph) else getattr(target, "fxpress_branches", None) or {}
    model = target.module if isinstance(target, Graph) else target
    entry = entries.get(name)
    if entry is None:
        raise RecipeError(f"no branch named {name!r}; the model has {', '.join(map(repr, entries)) or 'no branches'}")
    if entry.get("fused"):
        raise RecipeError(f"branch {name!r} is fused into its base weights; unfuse it before changing its scale")
    for module in branch_scale_buffers(model, entry):
        module.fill_(float(scale))
    entry["scale"] = float(scale)
    if isinstance(target, Graph):
        mark_branches(target)


def branch_scale_buffers(model: nn.Module, entry: dict[str, Any]) -> list[torch.Tensor]:
    """The scale buffers of a branch (one per wrapped layer, or the branch's own)."""
    if entry["kind"] == "lora":
        return [m.scale for m in lora_modules(model, entry)]
    return [model.get_submodule(p).scale for p in entry.get("scale_modules", [])]


__all__ = ["BRANCH_META", "branch_modules", "branch_scale_buffers", "check_new_name", "lora_modules", "mark_branches",
           "recaptured", "registry", "remap_paths", "resolve_names", "set_branch_scale"]
