"""Channel labels: follow every prunable channel through a captured graph, op by op.

Each output channel of a weight layer, each input column of a layer and each element of any other
parameter or buffer gets an integer label. The graph is then replayed on label tensors (int64, the
shape of each node's value, -1 where no channel lives): shape ops run on the labels themselves,
elementwise ops couple the labels that meet at the same position, normalisations and attention couple
the labels they mix, and a weight layer ends its input's labels (recording which input column each
came from) and starts fresh ones. Couplings are the edges of a networkx graph, whose connected
components are the sets of parameters slices that must be removed together.

Label 0 is FIXED: model inputs, model outputs and anything an op fxpress cannot follow touches.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx

FIXED = 0
NONE = -1
_SHIFT = 1 << 31  # labels stay below 2**31, so a pair (a, b) packs into one int64 a * _SHIFT + b

# ops whose result is the same op applied to the labels (layout only, or per-element identity)
SHAPE_OPS = {
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.transpose.int",
    "aten.permute.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims",
    "aten.squeeze.default", "aten.expand.default", "aten.flatten.using_ints", "aten.slice.Tensor",
    "aten.select.int", "aten.chunk.default", "aten.split.Tensor", "aten.split_with_sizes.default",
    "aten.cat.default", "aten.stack.default", "aten.t.default", "aten.unflatten.int", "aten.narrow.default",
    "aten.repeat.default", "aten.unbind.int",
}
IDENTITY_OPS = {
    "aten.contiguous.default", "aten.clone.default", "aten.alias.default", "aten.dropout.default",
    "aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten._to_copy.default", "aten.detach.default",
    "aten.lift_fresh_copy.default",
}
ELEMENTWISE_OPS = {
    "aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor", "aten.rsub.Scalar",
    "aten.add.Scalar", "aten.mul.Scalar", "aten.div.Scalar", "aten.sub.Scalar", "aten.pow.Tensor_Scalar",
    "aten.gelu.default", "aten.silu.default", "aten.relu.default", "aten.sigmoid.default", "aten.tanh.default",
    "aten.exp.default", "aten.sin.default", "aten.cos.default", "aten.neg.default", "aten.rsqrt.default",
    "aten.sqrt.default", "aten.square.default", "aten.abs.default", "aten.clamp.default", "aten.where.self",
    "aten.eq.Scalar", "aten.le.Tensor", "aten.lt.Tensor", "aten.gt.Tensor", "aten.ge.Tensor", "aten.log.default",
    "aten.mish.default", "aten.hardswish.default", "aten.leaky_relu.default", "aten.erf.default",
    "aten.masked_fill.Scalar", "aten.softplus.default",
}
NEAREST_UPSAMPLE_OPS = {"aten.upsample_nearest2d.vec", "aten.upsample_nearest2d.default",
                        "aten.upsample_nearest1d.vec", "aten.upsample_nearest3d.vec"}
PRODUCER_OPS = {"aten.linear.default", "aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default",
                "aten.embedding.default"}  # start fresh labels even when nothing labelled flows in
IGNORED_OPS = {"aten._assert_tensor_metadata.default", "aten.sym_size.int", "aten._assert_scalar.default"}


@dataclass
class LabelSpace:
    """Who every label is: ('out', layer, c), ('in', layer, c) or ('elem', parameter, flat index)."""

    blocks: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # (kind, name) -> (start, size)
    owners: list[tuple[str, str, int]] = field(default_factory=list)  # block starts, for decoding
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # 'elem' blocks: the tensor's shape

    def __post_init__(self) -> None:
        self.next = 1  # 0 is FIXED

    def block(self, kind: str, name: str, size: int) -> int:
        """Return the first label of the block (kind, name), allocating `size` labels the first time."""
        key = (kind, name)
        if key not in self.blocks:
            self.blocks[key] = (self.next, size)
            self.owners.append((kind, name, self.next))
            self.next += size
        return self.blocks[key][0]

    def decode(self, label: int) -> tuple[str, str, int]:
        """Return (kind, name, index) of a label (not FIXED)."""
        lo, hi = 0, len(self.owners) - 1
        while lo < hi:  # last block starting at or before `label`
            mid = (lo + hi + 1) // 2
            if self.owners[mid][2] <= label:
                lo = mid
            else:
                hi = mid - 1
        kind, name, start = self.owners[lo]
        return kind, name, label - start


@dataclass
class Propagation:
    """The result of replaying a graph on labels."""

    space: LabelSpace
    couplings: nx.Graph
    reasons: dict[int, str]  # label -> why it was tied to FIXED (first reason)
    tags: dict[int, set[str]]  # label -> how it was mixed ("heads:<module>:<count>", "group_norm", ...)
    # node name -> (labels found in its output, how many elements carry each, the output's numel);
    # filled only when asked for: what a node's work shrinks by when some labels go
    footprints: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)


class _Replay:
    def __init__(self, graph_module: fx.GraphModule, tensor_names: dict[str, str], user_inputs: list[str],
                 layer_params: set[str], footprints: bool = False):
        self.gm = graph_module
        self.footprints: dict[str, tuple[torch.Tensor, torch.Tensor, int]] | None = {} if footprints else None
        self.param_names = tensor_names
        self.user_inputs = set(user_inputs)
        self.layer_params = layer_params
        self.space = LabelSpace()
        self.edges = nx.Graph()
        self.reasons: dict[int, str] = {}
        self.tags: dict[int, set[str]] = {}
        self.env: dict[fx.Node, Any] = {}

    # ---- coupling helpers
    def couple(self, labels: torch.Tensor, reason: str | None = None) -> None:
        """Couple every distinct label in `labels` (one component); with a reason, also to FIXED."""
        distinct = torch.unique(labels[labels >= 0]).tolist()
        if reason is not None:
            for label in distinct:
                self.reasons.setdefault(label, reason)
            distinct = [FIXED, *distinct]
        self.edges.add_nodes_from(distinct)
        self.edges.add_edges_from((distinct[0], other) for other in distinct[1:])

    def couple_pairs(self, a: torch.Tensor, b: torch.Tensor, where: str = "") -> None:
        """Couple the labels of `a` and `b` that sit at the same position."""
        mask = (a >= 0) & (b >= 0) & (a != b)
        if bool(mask.any()):
            keys = torch.unique(a[mask] * _SHIFT + b[mask])  # one int64 per pair: 1-D unique is fast
            pairs = torch.stack([keys // _SHIFT, keys % _SHIFT], 1).tolist()
            self.edges.add_edges_from(map(tuple, pairs))
            for x, y in pairs:
                if FIXED in (x, y):
                    self.reasons.setdefault(x or y, f"meets a model input or output channel at {where}")

    def mix(self, labels: torch.Tensor, dims: list[int], tag: str) -> None:
        """Couple, for every position outside `dims`, all labels found along `dims` (the op mixes them)."""
        dims = [d % labels.dim() for d in dims]
        rest = [d for d in range(labels.dim()) if d not in dims]
        rows = labels.permute(*rest, *dims).reshape(math.prod(labels.shape[d] for d in rest) or 1, -1)
        for row in torch.unique(rows, dim=0):
            distinct = torch.unique(row[row >= 0]).tolist()
            if len(distinct) > 1:
                self.edges.add_edges_from((distinct[0], other) for other in distinct[1:])
            for label in distinct:
                self.tags.setdefault(label, set()).add(tag)

    # ---- node labels
    def labels_of(self, arg: Any) -> Any:
        """Return the label tensor (or nested list) of an FX argument, None if it carries none."""
        if isinstance(arg, fx.Node):
            return self.env.get(arg)
        if isinstance(arg, (list, tuple)):
            return [self.labels_of(a) for a in arg]
        return None

    def blank(self, node: fx.Node) -> torch.Tensor:
        val = node.meta.get("val")
        return torch.full(tuple(val.shape), NONE, dtype=torch.long)

    def param_labels(self, node: fx.Node, fqn: str) -> torch.Tensor | None:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.numel() <= 1:
            return None  # a scalar carries no channel
        start = self.space.block("elem", fqn, val.numel())
        self.space.shapes[fqn] = tuple(val.shape)
        return torch.arange(start, start + val.numel()).reshape(tuple(val.shape))

    def unknown(self, node: fx.Node, why: str) -> None:
        """An op fxpress cannot follow: tie every label reaching it to FIXED; its result is FIXED."""
        where = _where(node)
        for arg in node.all_input_nodes:
            labels = self.env.get(arg)
            if isinstance(labels, torch.Tensor):
                self.couple(labels, f"{why} at {where}")
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            self.env[node] = torch.full(tuple(val.shape), FIXED, dtype=torch.long)

    # ---- replay
    def run(self) -> Propagation:
        last_use = {}
        for node in self.gm.graph.nodes:
            for arg in node.all_input_nodes:
                last_use[arg] = node
        for node in self.gm.graph.nodes:
            self.step(node)
            labels = self.env.get(node)
            if self.footprints is not None and node.op == "call_function" and isinstance(labels, torch.Tensor):
                live = labels[labels > FIXED]
                if live.numel():
                    counts = torch.bincount(live)  # linear time; unique() sorts
                    found = torch.nonzero(counts).reshape(-1)
                    self.footprints[node.name] = (found, counts[found], labels.numel())
            for arg in node.all_input_nodes:
                if last_use.get(arg) is node and arg.op != "placeholder":
                    self.env.pop(arg, None)
        return Propagation(self.space, self.edges, self.reasons, self.tags, self.footprints or {})

    def step(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if node.name in self.user_inputs:
                if isinstance(val, torch.Tensor):
                    self.env[node] = torch.full(tuple(val.shape), FIXED, dtype=torch.long)
            else:  # a parameter, buffer or lifted constant
                fqn = self.param_names.get(node.name, node.name)
                if fqn not in self.layer_params:
                    labels = self.param_labels(node, fqn)
                    if labels is not None:
                        self.env[node] = labels
            return
        if node.op == "output":
            for labels in _flatten(self.labels_of(node.args[0])):
                self.couple(labels, "reaches the model output")
            return
        if node.op != "call_function":
            self.unknown(node, f"{node.op} node")
            return
        target = str(node.target)
        inputs = [self.env.get(a) for a in node.all_input_nodes]
        if node.target is operator.getitem:
            seq = self.env.get(node.args[0])
            if isinstance(seq, list):
                self.env[node] = seq[node.args[1]]
            elif isinstance(seq, torch.Tensor):
                self.unknown(node, "indexing a labelled tensor")
            return
        if target in IGNORED_OPS:
            return
        if not any(isinstance(x, torch.Tensor) for x in inputs) and target not in PRODUCER_OPS:
            return  # nothing labelled flows in: nothing to follow
        handler = _HANDLERS.get(target)
        if handler is not None:
            handler(self, node)
        elif target in SHAPE_OPS or target in IDENTITY_OPS:
            self.apply(node)
        elif target in ELEMENTWISE_OPS:
            self.elementwise(node)
        elif target in NEAREST_UPSAMPLE_OPS:
            self.apply(node, as_float=True)
        else:
            self.unknown(node, f"op {target} (fxpress cannot follow channels through it)")

    def substituted(self, node: fx.Node, as_float: bool) -> tuple[list, dict]:
        def sub(arg: Any) -> Any:
            if isinstance(arg, fx.Node):
                labels = self.env.get(arg)
                if labels is None:
                    val = arg.meta.get("val")
                    labels = self.blank(arg) if isinstance(val, torch.Tensor) else val
                if isinstance(labels, torch.Tensor) and as_float:
                    labels = labels.double()
                return labels
            if isinstance(arg, (list, tuple)):
                return type(arg)(sub(a) for a in arg)
            return arg
        return [sub(a) for a in node.args], {k: sub(v) for k, v in node.kwargs.items()}

    def apply(self, node: fx.Node, as_float: bool = False) -> None:
        """Run the op itself on the labels (exact for layout ops)."""
        args, kwargs = self.substituted(node, as_float)
        if str(node.target) in IDENTITY_OPS:
            self.env[node] = args[0]
            return
        out = node.target(*args, **kwargs)
        if as_float:
            out = out.round().long()
        self.env[node] = list(out) if isinstance(out, (list, tuple)) else out

    def elementwise(self, node: fx.Node) -> None:
        """Couple labels meeting at the same position (after broadcasting); the result keeps them."""
        val = node.meta.get("val")
        shape = tuple(val.shape)
        tensors = [self.env.get(a) for a in node.all_input_nodes]
        present = [t.expand(shape) for t in tensors if isinstance(t, torch.Tensor)]
        if not present:
            return
        out = present[0].clone()
        for other in present[1:]:
            self.couple_pairs(out, other, _where(node))
            out = torch.where(out >= 0, out, other)
        self.env[node] = out


    def elementwise_with_params(self, node: fx.Node, x: torch.Tensor | None, channel_dim: int,
                                params: tuple) -> None:
        """The result of a norm keeps x's labels, coupled with its weight/bias along `channel_dim`."""
        val = node.meta["val"]
        out = x.clone() if x is not None else torch.full(tuple(val.shape), NONE, dtype=torch.long)
        for p in params:
            labels = self.env.get(p) if isinstance(p, fx.Node) else None
            if labels is None:
                continue
            shape = [1] * out.dim()
            shape[channel_dim] = labels.numel()
            if labels.dim() > 1:  # layer_norm over several trailing dims
                shape = [1] * (out.dim() - labels.dim()) + list(labels.shape)
            spread = labels.reshape(shape).expand(out.shape)
            self.couple_pairs(out, spread)
            out = torch.where(out >= 0, out, spread)
        self.env[node] = out


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return []


def _module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _where(node: fx.Node) -> str:
    path = _module_of(node)
    return f"node {node.name}" + (f" in {path!r}" if path else "")


def _weight_layer(self: _Replay, node: fx.Node) -> None:
    """linear / conv with a parameter weight: end the input's labels, start the layer's own."""
    w_node = node.args[1]
    fqn = self.param_names.get(w_node.name) if isinstance(w_node, fx.Node) else None
    if fqn is None or not fqn.endswith(".weight"):
        self.unknown(node, "a layer whose weight is computed at run time")
        return
    path = fqn[: -len(".weight")]
    target = str(node.target)
    channel_dim = -1 if target == "aten.linear.default" else 1
    weight = w_node.meta["val"]
    out_channels, in_per_group = int(weight.shape[0]), int(weight.shape[1])
    groups = 1 if target == "aten.linear.default" else int(node.args[6] if len(node.args) > 6 else 1)
    x = self.env.get(node.args[0])
    val = node.meta["val"]
    start = self.space.block("out", path, out_channels)
    shape = [1] * val.dim()
    shape[channel_dim] = out_channels
    out = torch.arange(start, start + out_channels).reshape(shape).expand(tuple(val.shape)).clone()
    if x is not None:
        moved = x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
        columns = torch.unique(moved, dim=0)  # labels of each input channel (rows: distinct positions)
        if groups == 1:
            in_start = self.space.block("in", path, in_per_group)
            self.edges.add_nodes_from(range(in_start, in_start + in_per_group))
            self.couple_pairs(columns, torch.arange(in_start, in_start + in_per_group).expand_as(columns),
                              _where(node))
        elif groups == out_channels == x.shape[channel_dim]:  # depthwise: channel c in -> channel c out
            self.couple_pairs(columns, torch.arange(start, start + out_channels).expand_as(columns), _where(node))
        else:
            self.couple(x, f"grouped {target} with {groups} groups at {_where(node)}")
    if len(node.args) > 2 and isinstance(node.args[2], fx.Node) and node.args[2].name not in self.param_names:
        self.couple(out, f"a bias computed at run time at {_where(node)}")
    self.edges.add_nodes_from(range(start, start + out_channels))
    self.env[node] = out


def _embedding(self: _Replay, node: fx.Node) -> None:
    """An embedding table's columns are the output channels."""
    w_node = node.args[0]
    fqn = self.param_names.get(w_node.name) if isinstance(w_node, fx.Node) else None
    if fqn is None:
        self.unknown(node, "an embedding whose table is computed at run time")
        return
    width = int(w_node.meta["val"].shape[1])
    start = self.space.block("out", fqn.removesuffix(".weight"), width)
    val = node.meta["val"]
    self.env[node] = torch.arange(start, start + width).expand(tuple(val.shape)).clone()


def _group_norm(self: _Replay, node: fx.Node) -> None:
    """group_norm(x, groups, weight, bias, eps): channels of one group are normalised together."""
    x = self.env.get(node.args[0])
    groups = int(node.args[1])
    if x is not None:
        n, c = x.shape[0], x.shape[1]
        grouped = x.reshape(n, groups, c // groups, -1)
        self.mix(grouped, [2, 3], "group_norm")
    self.elementwise_with_params(node, x, 1, node.args[2:4])


def _layer_norm(self: _Replay, node: fx.Node) -> None:
    """layer_norm(x, shape, weight, bias, eps): the trailing dims are normalised together."""
    x = self.env.get(node.args[0])
    ndims = len(node.args[1])
    if x is not None:
        self.mix(x, list(range(x.dim() - ndims, x.dim())), f"layer_norm@{node.name}")
    self.elementwise_with_params(node, x, -1, node.args[2:4])


def _softmax(self: _Replay, node: fx.Node) -> None:
    x = self.env.get(node.args[0])
    self.mix(x, [int(node.args[1])], f"softmax@{node.name}")
    self.env[node] = x


def _reduce(self: _Replay, node: fx.Node) -> None:
    """mean/sum/amax over dims: the reduced labels are mixed; the rest follow."""
    x = self.env.get(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else list(range(x.dim()))
    dims = [dims] if isinstance(dims, int) else list(dims)
    keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    self.mix(x, dims, f"reduce@{node.name}")
    out = x
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        out = out.select(d, 0).unsqueeze(d) if keep else out.select(d, 0)
    self.env[node] = out.clone()


def _attention(self: _Replay, node: fx.Node) -> None:
    """scaled_dot_product_attention(q, k, v): everything of one head is mixed; the output takes v's head."""
    q, k, v = (self.env.get(a) for a in node.args[:3])
    val = node.meta["val"]
    heads = int(val.shape[-3])
    tag = f"heads:{_module_of(node)}:{heads}"
    merged = []
    for h in range(heads):
        parts = [t.select(-3, h).reshape(-1) for t in (q, k, v) if t is not None and t.shape[-3] == heads]
        parts += [t.reshape(-1) for t in (q, k, v) if t is not None and t.shape[-3] != heads]
        both = torch.cat(parts)
        self.couple(both)
        for label in torch.unique(both[both >= 0]).tolist():
            self.tags.setdefault(label, set()).add(tag)
        present = both[both >= 0]
        merged.append(int(present[0]) if present.numel() else NONE)
    if len(node.args) > 3 and isinstance(node.args[3], fx.Node) and self.env.get(node.args[3]) is not None:
        self.couple(self.env[node.args[3]], f"a labelled attention mask at {_where(node)}")
    shape = [1] * val.dim()
    shape[-3] = heads
    self.env[node] = torch.tensor(merged).reshape(shape).expand(tuple(val.shape)).clone()


def _einsum(self: _Replay, node: fx.Node) -> None:
    """einsum: a one-operand permutation ("nhwpqc->nchpwq") is layout and runs on the labels."""
    equation, operands = node.args[0], node.args[1]
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    if len(operands) == 1 and rhs and sorted(lhs) == sorted(rhs) and len(set(lhs)) == len(lhs):
        self.apply(node)
    else:
        self.unknown(node, f"einsum {equation!r} (only one-operand permutations are followed)")


def _index(self: _Replay, node: fx.Node) -> None:
    """x[indices] with data-dependent indices: exact when x's labels do not vary along the indexed dims."""
    x = self.env.get(node.args[0])
    indices = node.args[1]
    dims = [d for d, i in enumerate(indices) if i is not None]
    constant = all(bool((x == x.select(d, 0).unsqueeze(d)).all()) for d in dims)
    if not constant:
        self.unknown(node, "indexing along labelled dims")
        return
    zeros = [None if i is None else torch.zeros(tuple(i.meta["val"].shape), dtype=torch.long) for i in indices]
    self.env[node] = torch.ops.aten.index.Tensor(x, zeros)



_HANDLERS = {
    "aten.linear.default": _weight_layer,
    "aten.conv1d.default": _weight_layer,
    "aten.conv2d.default": _weight_layer,
    "aten.conv3d.default": _weight_layer,
    "aten.embedding.default": _embedding,
    "aten.group_norm.default": _group_norm,
    "aten.layer_norm.default": _layer_norm,
    "aten.softmax.int": _softmax,
    "aten._softmax.default": _softmax,
    "aten.log_softmax.int": _softmax,
    "aten.mean.dim": _reduce,
    "aten.sum.dim_IntList": _reduce,
    "aten.amax.default": _reduce,
    "aten.scaled_dot_product_attention.default": _attention,
    "aten.index.Tensor": _index,
    "aten.einsum.default": _einsum,
}


def propagate(graph_module: fx.GraphModule, tensor_names: dict[str, str], user_inputs: list[str],
              layer_params: set[str], footprints: bool = False) -> Propagation:
    """Replay `graph_module` on channel labels; return the label space, couplings, reasons and tags.

    `tensor_names` maps placeholders to parameter/buffer names; `layer_params` are the weights and
    biases of weight layers (their channels are labelled as layer outputs and inputs, not elements).
    With `footprints`, also record which labels each node's output carries and on how many elements.
    """
    return _Replay(graph_module, tensor_names, user_inputs, layer_params, footprints).run()
