"""The branch registry of a Graph, and the marks that tell a branch's layers and FX nodes apart.

`graph.extras["branches"]` maps each branch name to what rebuilds it (kind, role, scale, the module
paths it wraps, and kind-specific fields such as a LoRA's rank); the artifact saves it so loading puts
the same branches back. Layers of a branch carry a `BranchSpec` in their annotation (and a keep reason,
so quantization leaves them in float), and every FX node a branch runs, its parameters' placeholders
included, is marked with `node.meta["fxpress_branch"]` (the branch's name).
"""

from __future__ import annotations

from typing import Any

import torch

from fxpress.ir.annotations import BranchSpec
from fxpress.ir.graph import Graph

BRANCH_META = "fxpress_branch"
LORA_PARTS = ("lora_A", "lora_B", "dropout")


def registry(graph: Graph) -> dict[str, dict[str, Any]]:
    """Return the graph's branch registry (created empty when absent)."""
    return graph.extras.setdefault("branches", {})


def branch_modules(graph: Graph, name: str) -> list[str]:
    """The module paths that hold branch `name`'s own parameters and operations."""
    entry = registry(graph)[name]
    if entry["kind"] == "lora":
        return [f"{t}.{part}" for t in entry["targets"] for part in LORA_PARTS]
    return list(entry.get("modules", []))


def _owner(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values() if path]
    return paths[-1] if paths else None


def mark_branches(graph: Graph) -> None:
    """Annotate every layer and FX node of every registered branch (see the module docstring)."""
    entries = registry(graph)
    owned: dict[str, str] = {}
    wrappers: dict[str, str] = {}
    scale_owners: dict[str, str] = {}
    for name, entry in entries.items():
        for path in branch_modules(graph, name):
            owned[path] = name
        if entry["kind"] == "lora":
            wrappers.update({t: name for t in entry["targets"]})
        wrappers.update({p: name for p in entry.get("wrappers", [])})
        scale_owners.update({p: name for p in entry.get("scale_modules", [])})

    def owner_branch(path: str | None) -> str | None:
        while path:  # the path itself, then each enclosing module
            if path in owned:
                return owned[path]
            path = path.rpartition(".")[0]
        return None

    for path in graph.layers:
        name = owner_branch(path)
        if name is not None:
            entry = entries[name]
            ann = graph.annotation(path)
            ann.branch = BranchSpec(name, entry["kind"], entry["role"], float(entry["scale"]))
            ann.keep_reason = ann.keep_reason or f"branch:{name}"  # branch layers stay in float

    names = {**graph.param_names, **graph.buffer_names}
    for node in graph.graph_module.graph.nodes:
        node.meta.pop(BRANCH_META, None)
        if node.op == "placeholder":
            module_path, _, leaf = names.get(node.name, "").rpartition(".")
            if leaf == "scale":  # a branch's scale buffer, on its wrapper or its own module
                name = owner_branch(module_path) or wrappers.get(module_path) or scale_owners.get(module_path)
            else:
                name = owner_branch(module_path)
        else:
            owner = _owner(node)
            name = owner_branch(owner) or wrappers.get(owner)  # or the wrapper's own add and scale multiply
        if name is not None:
            node.meta[BRANCH_META] = name
