"""The view of weight-bearing layers (linear, conv) of a captured graph, keyed by module path."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx

LAYER_OPS = {
    "aten.linear.default": "linear",
    "aten.conv1d.default": "conv1d",
    "aten.conv2d.default": "conv2d",
    "aten.conv3d.default": "conv3d",
}


@dataclass
class Layer:
    """One weight-bearing module as seen in the graph (all its calls summed)."""

    path: str
    kind: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    flops: int
    bytes: int
    nodes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        """Weight plus bias element count."""
        return math.prod(self.weight_shape) + (self.weight_shape[0] if self.has_bias else 0)

    @property
    def weight_params(self) -> int:
        return math.prod(self.weight_shape)


def _shape(node: fx.Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()


def _itemsize(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.element_size() if isinstance(val, torch.Tensor) else 4


def find_layers(graph: fx.Graph, param_names: dict[str, str]) -> dict[str, Layer]:
    """Return the weight-bearing layers of `graph`, keyed by module path, in execution order.

    `param_names` maps placeholder names to parameter FQNs (torch.export's graph signature).
    """
    layers: dict[str, Layer] = {}
    for node in graph.nodes:
        kind = LAYER_OPS.get(str(node.target)) if node.op == "call_function" else None
        if kind is None or len(node.args) < 2 or not isinstance(node.args[1], fx.Node):
            continue
        fqn = param_names.get(node.args[1].name)
        if fqn is None or not fqn.endswith(".weight"):
            continue  # weight computed at run time, not a parameter: not a compressible layer
        path = fqn[: -len(".weight")]
        in_node, w_node = node.args[0], node.args[1]
        w_shape, out_shape = _shape(w_node), _shape(node)
        reduce = math.prod(w_shape[1:])
        flops = 2 * math.prod(out_shape) * reduce
        has_bias = len(node.args) > 2 and node.args[2] is not None
        nbytes = (math.prod(w_shape) * _itemsize(w_node) + math.prod(_shape(in_node)) * _itemsize(in_node)
                  + math.prod(out_shape) * _itemsize(node))
        if path in layers:  # the same module called again: sum its costs
            layer = layers[path]
            layer.flops += flops
            layer.bytes += nbytes
            layer.nodes.append(node.name)
            continue
        layers[path] = Layer(path, kind, w_shape, has_bias, _shape(in_node), out_shape, flops, nbytes,
                             [node.name])
    return layers
