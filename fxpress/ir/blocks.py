"""Block units: whole residual blocks that can be removed by passing their input straight through.

A block is an item of a ModuleList (transformer_blocks.3, down_blocks.1.resnets.0, ...) that holds
weight layers. It is removable when, in the captured graph, it returns one tensor shaped like one
of its inputs (the stream) and that input reaches the output through a residual path (adds, scalar
scaling, layout ops, no weight layer): then dropping the block is the same as setting its residual
branch to zero. Anything else is listed with the reason it cannot be bypassed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx

from fxpress.ir.dataflow import module_nodes
from fxpress.ir.graph import Graph

_RESIDUAL_OPS = {
    "aten.add.Tensor", "aten.div.Tensor", "aten.mul.Tensor", "aten.div.Scalar", "aten.mul.Scalar",
    "aten.view.default", "aten.reshape.default", "aten.permute.default", "aten.transpose.int",
    "aten.contiguous.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.unsqueeze.default",
    "aten.clone.default", "aten.to.dtype", "aten.dropout.default", "aten.alias.default",
}


@dataclass(frozen=True)
class Block:
    """A removable block: its module path, the graph nodes of its stream input and output, its params."""

    path: str
    stream_input: str
    output: str
    params: int


@dataclass
class BlockUnits:
    """Removable blocks in execution order, and the block-like modules that are not, with why."""

    blocks: list[Block] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else None


def _residual_reaches(output: fx.Node, stream: fx.Node, inside: set[fx.Node], layers: set[str]) -> bool:
    """True when `stream` reaches `output` through residual-path ops only (no weight layer)."""
    todo, seen = [output], set()
    while todo:
        node = todo.pop()
        if node is stream:
            return True
        if node in seen or node not in inside or node.name in layers or str(node.target) not in _RESIDUAL_OPS:
            continue
        seen.add(node)
        todo.extend(node.all_input_nodes)
    return False


def block_units(graph: Graph) -> BlockUnits:
    """Return the ModuleList items of `graph` that can be bypassed, and the refused ones with reasons."""
    gm = graph.graph_module
    members = module_nodes(gm.graph)
    layer_nodes = {n for layer in graph.layers.values() for n in layer.nodes}
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder" and n.name not in graph.input_names}
    result = BlockUnits()
    for path, nodes in members.items():
        if not re.search(r"\.\d+$", path) or not any(n.name in layer_nodes for n in nodes):
            continue
        if any(path.startswith(b.path + ".") for b in result.blocks):
            continue  # inside a removable block: the block is the unit
        inside = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside and a not in placeholders}
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        params = sum(p.numel() for p in graph.module.get_submodule(path).parameters())
        calls = {next((k for k, (p, _) in (n.meta.get("nn_module_stack") or {}).items() if p == path), None)
                 for n in nodes}
        if len(calls) > 1:
            result.refused[path] = f"called {len(calls)} times"
            continue
        if len(outputs) != 1 or _shape(outputs[0]) is None:
            result.refused[path] = f"returns {len(outputs)} values"
            continue
        output = outputs[0]
        streams = [a for a in inputs if _shape(a) == _shape(output)]
        if len(streams) != 1:
            result.refused[path] = (f"its output {list(_shape(output)[0])} matches {len(streams)} of its inputs, "
                                    "so no single input can replace it")
            continue
        if not _residual_reaches(output, streams[0], inside, layer_nodes):
            result.refused[path] = "its input reaches its output only through weight layers (no residual path)"
            continue
        result.blocks.append(Block(path, streams[0].name, output.name, params))
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    result.blocks.sort(key=lambda b: order[b.output])
    return result
