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
# fxpress's low-bit ops (reference and Triton): (x, packed codes buffer, scale, bias, width, offset, in_features |
# weight_shape, ...); a captured low-bit model's layers are these calls
LOWBIT_OPS = {
    "fxpress.lowbit_linear.default": "linear",
    "fxpress.lowbit_conv2d.default": "conv2d",
    "fxpress.lowbit_linear_triton.default": "linear",
    "fxpress.lowbit_conv2d_triton.default": "conv2d",
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


def _lowbit_weight_shape(node: fx.Node, kind: str) -> tuple[int, ...]:
    if kind == "linear":
        return (_shape(node.args[1])[0], int(node.args[6]))
    return tuple(int(s) for s in node.args[6])


def find_layers(graph: fx.Graph, param_names: dict[str, str],
                buffer_names: dict[str, str] | None = None) -> dict[str, Layer]:
    """Return the weight-bearing layers of `graph`, keyed by module path, in execution order.

    `param_names` maps placeholder names to parameter FQNs (torch.export's graph signature);
    `buffer_names` to buffer FQNs, where fxpress's low-bit layers keep their packed codes.
    """
    layers: dict[str, Layer] = {}
    for node in graph.nodes:
        target = str(node.target) if node.op == "call_function" else ""
        kind = LAYER_OPS.get(target) or LOWBIT_OPS.get(target)
        if kind is None or len(node.args) < 2 or not isinstance(node.args[1], fx.Node):
            continue
        if target in LOWBIT_OPS:
            fqn = (buffer_names or {}).get(node.args[1].name)
            if fqn is None or not fqn.endswith(".packed"):
                continue
            path = fqn[: -len(".packed")]
            w_shape = _lowbit_weight_shape(node, kind)
        else:
            fqn = param_names.get(node.args[1].name)
            if fqn is None or not fqn.endswith(".weight"):
                continue  # weight computed at run time, not a parameter: not a compressible layer
            path = fqn[: -len(".weight")]
            w_shape = _shape(node.args[1])
        in_node, w_node = node.args[0], node.args[1]
        out_shape = _shape(node)
        reduce = math.prod(w_shape[1:])
        flops = 2 * math.prod(out_shape) * reduce
        bias_at = 3 if target in LOWBIT_OPS else 2
        has_bias = len(node.args) > bias_at and node.args[bias_at] is not None
        nbytes = (math.prod(_shape(w_node)) * _itemsize(w_node) + math.prod(_shape(in_node)) * _itemsize(in_node)
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
