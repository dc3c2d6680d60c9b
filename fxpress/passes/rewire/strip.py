"""`StripBranches`: remove branches (train-only ones by default) so the model is what it was without them."""

from __future__ import annotations

from typing import Any

from torch import nn

from fxpress.errors import RecipeError
from fxpress.ir.graph import Graph, Inputs
from fxpress.kernels.control import ControlledTransformer, ControlledUNet
from fxpress.kernels.image_adapter import ImageAdapted
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.module_edit import replace_submodule
from fxpress.passes.rewire.branches import recaptured, registry, remap_paths, resolve_names
from fxpress.passes.rewire.image_adapter import adapted_path


def _strip_lora(model: nn.Module, name: str, entry: dict[str, Any]) -> tuple[nn.Module, dict[str, str]]:
    if entry.get("fused"):
        raise RecipeError(f"branch {name!r} is fused into its base weights; unfuse it (UnfuseLoRA) before "
                          "stripping it, or keep it")
    renamed = {}
    for path in entry["targets"]:
        replace_submodule(model, path, model.get_submodule(path).base_layer)
        renamed[f"{path}.base_layer"] = path
    return model, renamed


def _strip_control(model: nn.Module, name: str, entry: dict[str, Any]) -> tuple[nn.Module, dict[str, str]]:
    if isinstance(model, ImageAdapted):  # a control branch added before an image adapter sits inside it
        inner, renamed = _strip_control(model.model, name, entry)
        model.model = inner
        return model, {f"model.{old}": f"model.{new}" for old, new in renamed.items()}
    if isinstance(model, ControlledTransformer):
        inner, blocks, count = model.model, entry["blocks"], entry["count"]
        items = inner.get_submodule(blocks)
        for i in range(count):
            items[i] = items[i].block
        wrapped = [f"{blocks}.{i}" for i in range(count)]

        def before(path: str) -> str:
            owner = next((w for w in wrapped if path == w or path.startswith(w + ".")), None)
            return f"model.{owner}.block{path[len(owner):]}" if owner else f"model.{path}"

        return inner, {before(p): p for p, _ in inner.named_modules() if p}
    if not isinstance(model, ControlledUNet):
        raise RecipeError(f"branch {name!r}: the model is no longer the controlled model the branch was attached to")
    renamed = {f"unet.{p}": p for p, _ in model.unet.named_modules() if p}
    return model.unet, renamed


def _strip_image_adapter(model: nn.Module, name: str, entry: dict[str, Any]) -> tuple[nn.Module, dict[str, str]]:
    if not isinstance(model, ImageAdapted):
        raise RecipeError(f"branch {name!r}: the model is no longer the ImageAdapted model the adapter was added to")
    inner = model.model
    for path in entry["targets"]:
        replace_submodule(inner, path, inner.get_submodule(path).attn)
    renamed = {adapted_path(p, entry["targets"]): p for p, _ in inner.named_modules() if p}
    return inner, renamed


STRIPPERS = {"lora": _strip_lora, "control": _strip_control, "image_adapter": _strip_image_adapter}


def _without(inputs: Inputs, names: list[str]) -> Inputs:
    return Inputs(inputs.args, {k: v for k, v in inputs.kwargs.items() if k not in names})


class StripBranches(Pass):
    """Remove the branches of `role` (all of them, or those in `names`, which must all have that role).

    The result computes exactly what the model computed with those branches at scale 0, and its
    captured graph holds none of their parameters, inputs or operations. Stripping a kept adapter
    needs role="adapter" said outright.
    """

    provides = ("stripped",)
    transforms = True

    def __init__(self, role: str = "train_only", names: list[str] | tuple[str, ...] | None = None):
        if role not in ("adapter", "train_only"):
            raise RecipeError(f"StripBranches: role must be 'adapter' or 'train_only', got {role!r}")
        self.role, self.names = role, None if names is None else list(names)

    def chosen(self, graph: Graph) -> list[str]:
        """The branches this pass removes from `graph` (RecipeError for an unknown or other-role name)."""
        entries = registry(graph)
        if self.names is None:
            return [n for n, e in entries.items() if e["role"] == self.role]
        names = resolve_names(graph, self.names, self.name)
        other = [n for n in names if entries[n]["role"] != self.role]
        if other:
            roles = ", ".join(f"{n!r} is {entries[n]['role']!r}" for n in other)
            raise RecipeError(f"StripBranches(role={self.role!r}) refuses {roles}; say role="
                              f"{entries[other[0]]['role']!r} to strip {'it' if len(other) == 1 else 'them'}")
        return names

    def run(self, graph: Graph) -> PassResult:
        names = self.chosen(graph)
        if not names:
            return PassResult(graph, False, {"stripped": [], "role": self.role})
        model, renamed = graph.module, {}
        entries = registry(graph)
        order = {"lora": 0, "control": 1, "image_adapter": 2}  # inner wrappers before outer ones
        removed = {}
        for name in sorted(names, key=lambda n: order[entries[n]["kind"]]):
            model, more = STRIPPERS[entries[name]["kind"]](model, name, entries[name])
            removed[name] = entries.pop(name)
            for entry in entries.values():  # the branches left follow their modules to their new paths
                remap_paths(entry, lambda p, more=more: more.get(p, p))
            renamed = {old: more.get(new, new) for old, new in renamed.items()}
            renamed.update({old: new for old, new in more.items() if old not in renamed.values()})
        inputs = [e["input"] for e in removed.values() if e.get("input")]
        if inputs:
            graph.example = _without(graph.example, inputs)
            graph.calibration = [_without(c, inputs) for c in graph.calibration]
        new = recaptured(graph, model, renamed)
        return PassResult(new, True, {"stripped": names, "role": self.role,
                                      "layers": sum(len(e.get("targets", [])) for e in removed.values())})
