"""Fold the parts of a captured program that depend on no input into constants.

An unrolled sampler calls its denoiser at fixed timesteps, so everything computed from the timestep
alone (the sinusoidal embedding, the time MLP, every block's time projection) is the same on every run.
Computed once at export, each becomes a small per-step constant and the weights that only served it
leave the file. Only values up to `max_elements` are folded, so a fold never stores a weight twice
(say, a transposed copy beside the original).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from fxpress.ir.graph import Inputs


def _impure(node: fx.Node) -> bool:
    target = node.target
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags or getattr(target, "_schema", None) is not None and \
        target._schema.is_mutable


def _fetch(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def fold_constants(program: torch.export.ExportedProgram, max_elements: int = 1 << 16) -> tuple[fx.GraphModule, dict]:
    """Return (a module computing what `program` computes with its input-free values of at most
    `max_elements` elements precomputed, a report: values folded, parameters and bytes dropped)."""
    gm = program.module()
    graph = gm.graph
    constant: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
        elif node.op == "call_function" and not _impure(node) and all(a in constant for a in node.all_input_nodes):
            constant.add(node)
    frontier = [n for n in graph.nodes if n in constant and n.op == "call_function"
                and any(u not in constant for u in n.users)]
    values: dict[fx.Node, Any] = {}

    def evaluate(node: fx.Node) -> Any:
        if node in values:
            return values[node]
        if node.op == "get_attr":
            out = _fetch(gm, node.target)
        else:
            args = fx.node.map_arg(node.args, evaluate)
            kwargs = fx.node.map_arg(node.kwargs, evaluate)
            out = node.target(*args, **kwargs)
        values[node] = out
        return out

    before = {name: t.numel() * t.element_size() for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
    folded = 0
    with torch.no_grad():
        for i, node in enumerate(frontier):
            if "val" in node.meta and isinstance(node.meta["val"], torch.Tensor) \
                    and node.meta["val"].numel() > max_elements:
                continue
            value = evaluate(node)
            if not isinstance(value, torch.Tensor) or value.numel() > max_elements:
                continue
            name = f"_folded_{i}"
            gm.register_buffer(name, value.detach().clone())
            with graph.inserting_before(node):
                replacement = graph.get_attr(name)
            replacement.meta = dict(node.meta)
            node.replace_all_uses_with(replacement)
            folded += 1
    graph.eliminate_dead_code()
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    dropped = 0
    for name, size in before.items():
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            holder = _fetch(gm, owner) if owner else gm
            if leaf in holder._parameters:
                del holder._parameters[leaf]
            elif leaf in holder._buffers:
                del holder._buffers[leaf]
            dropped += size
    gm.delete_all_unused_submodules()
    gm = fx.GraphModule(gm, graph)  # a plain GraphModule: train()/eval() work on it, as exporters expect
    added = sum(b.numel() * b.element_size() for n, b in gm.named_buffers() if n.startswith("_folded_"))
    return gm, {"folded": folded, "dropped_bytes": dropped, "added_bytes": added,
                "dropped_tensors": sum(1 for n in before if n not in used)}


def fold_module(module: nn.Module, example_inputs: Any, max_elements: int = 1 << 16) -> tuple[fx.GraphModule, dict]:
    """Capture `module` on `example_inputs` and fold its input-free values (see `fold_constants`)."""
    inputs = Inputs.of(example_inputs)
    with torch.no_grad():
        program = torch.export.export(module, tuple(inputs.args), dict(inputs.kwargs), strict=False)
        return fold_constants(program, max_elements)
