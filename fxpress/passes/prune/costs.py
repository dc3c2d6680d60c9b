"""What removing a candidate saves: measured latency on this machine (default), FLOPs or parameters.

The latency model times every op node of the captured graph on its own (random inputs of the node's
shapes, median of `repeats` runs), then the whole model once; the difference (module calls, hooks,
dispatch: most of a small model's eager forward) is spread evenly over the nodes as a fixed overhead.
A linear, conv or attention node's time shrinks in proportion to the channels (or heads) removed from
its weights; any other node's time (norms, activations, modulations, reshapes) shrinks by the share of
its output elements that the removed units occupy (their footprint, from the channel labels); a block
saves the time and the overhead of every node inside it. FLOPs count linear, conv and attention nodes.
"""

from __future__ import annotations

import math
import operator
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from fxpress.errors import RecipeError
from fxpress.ir.graph import Graph, Inputs
from fxpress.passes.progress import progress_bar
from fxpress.passes.prune.candidates import Candidate

COST_KINDS = ("latency", "flops", "params")
WEIGHTED_OPS = {"aten.linear.default", "aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default",
             "aten.scaled_dot_product_attention.default"}


@dataclass
class CostModel:
    """Cost per graph node, and the index from layers, attention modules and blocks to nodes."""

    kind: str
    per_node: dict[str, float] = field(default_factory=dict)
    layer_nodes: dict[str, list[str]] = field(default_factory=dict)  # layer path -> its call nodes
    attention_nodes: dict[str, list[str]] = field(default_factory=dict)  # attention module -> sdpa nodes
    module_nodes: dict[str, list[str]] = field(default_factory=dict)  # any module path -> costed nodes inside
    params: dict[str, int] = field(default_factory=dict)  # parameter name -> numel
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    other_nodes: set[str] = field(default_factory=set)  # timed nodes that shrink by footprint, not weights
    overhead: float = 0.0  # latency: per node, what the whole forward costs beyond its ops (Python, dispatch)

    @property
    def total(self) -> float:
        """The model's cost: sum over nodes (latency: plus the overhead of each; FLOPs) or all parameters."""
        if self.kind == "params":
            return float(sum(self.params.values()))
        return sum(self.per_node.values()) + self.overhead * len(self.per_node)


def _fake(value: object) -> object:
    if isinstance(value, fx.Node):
        val = value.meta.get("val")
        if isinstance(val, torch.Tensor):
            return torch.randn(tuple(val.shape)) if val.is_floating_point() else torch.zeros(tuple(val.shape),
                                                                                             dtype=val.dtype)
        return val
    if isinstance(value, (list, tuple)):
        return type(value)(_fake(v) for v in value)
    return value


@torch.no_grad()
def measure_latency(model: nn.Module, inputs: Inputs, repeats: int = 10) -> float:
    """Return the median wall time in seconds of one forward of `model` on `inputs` (after 2 warm-ups);
    on a GPU each run waits for the device to finish."""
    param = next(model.parameters(), None)
    sync = torch.cuda.synchronize if param is not None and param.is_cuda else (lambda: None)
    for _ in range(2):
        model(*inputs.args, **inputs.kwargs)
    runs = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        model(*inputs.args, **inputs.kwargs)
        sync()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def latencies_in_turns(models: list[nn.Module], inputs: Inputs, turns: int = 10) -> list[float]:
    """Return each model's median forward time in seconds, the models taking turns (one forward each per
    turn, after 2 warm-ups each) so that drift of the machine hits them all alike."""
    params = [next(m.parameters(), None) for m in models]
    cuda = any(p is not None and p.is_cuda for p in params)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    turns = max(turns, 1)
    with torch.no_grad(), progress_bar(f"timing {len(models)} models in turns (forwards)",
                                       len(models) * (turns + 2)) as advance:
        for model in models:
            for _ in range(2):
                model(*inputs.args, **inputs.kwargs)
                advance()
        runs: list[list[float]] = [[] for _ in models]
        for _ in range(turns):
            for model, times in zip(models, runs):
                sync()
                start = time.perf_counter()
                model(*inputs.args, **inputs.kwargs)
                sync()
                times.append(time.perf_counter() - start)
                advance()
    return [statistics.median(times) for times in runs]


def _timeable(node: fx.Node) -> bool:
    """An op node that computes tensors (not a getitem of a tuple, not a shape assertion)."""
    val = node.meta.get("val")
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    return isinstance(val, torch.Tensor) or (isinstance(val, (list, tuple)) and
                                             any(isinstance(v, torch.Tensor) for v in val))


@torch.no_grad()
def _time_node(node: fx.Node, repeats: int) -> float:
    args, kwargs = _fake(node.args), {k: _fake(v) for k, v in node.kwargs.items()}
    try:
        for _ in range(2):
            node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op random inputs cannot drive (indices out of range): no time
        return 0.0
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        node.target(*args, **kwargs)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def _flops(node: fx.Node) -> float:
    out = node.meta["val"]
    if str(node.target) == "aten.scaled_dot_product_attention.default":
        q, k, v = (a.meta["val"] for a in node.args[:3])
        return 2.0 * math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    weight = node.args[1].meta["val"]
    return 2.0 * math.prod(out.shape) * math.prod(weight.shape[1:])


def _weighted(node: fx.Node) -> bool:
    return node.op == "call_function" and str(node.target) in WEIGHTED_OPS


def _add_node(graph: Graph, model: CostModel, node: fx.Node, repeats: int) -> None:
    """Index `node` by layer, attention module and enclosing modules, and give it its cost."""
    stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path]
    if not _weighted(node):
        model.other_nodes.add(node.name)
    elif str(node.target) == "aten.scaled_dot_product_attention.default":
        model.attention_nodes.setdefault(stack[-1] if stack else "", []).append(node.name)
    else:
        fqn = graph.param_names.get(node.args[1].name, "") if isinstance(node.args[1], fx.Node) else ""
        model.layer_nodes.setdefault(fqn.removesuffix(".weight"), []).append(node.name)
    for path in stack:
        model.module_nodes.setdefault(path, []).append(node.name)
    if model.kind == "latency":
        model.per_node[node.name] = _time_node(node, repeats)
    elif model.kind == "flops":
        model.per_node[node.name] = _flops(node)


def build_cost_model(graph: Graph, kind: str = "latency", repeats: int = 10) -> CostModel:
    """Return the cost model of `graph` for `kind` ('latency', 'flops' or 'params')."""
    if kind not in COST_KINDS:
        raise RecipeError(f"unknown cost {kind!r}; use one of {', '.join(COST_KINDS)}")
    model = CostModel(kind)
    nodes = [n for n in graph.graph_module.graph.nodes if _weighted(n) or (kind == "latency" and _timeable(n))]
    if kind == "latency":
        with progress_bar(f"latency model: timing {len(nodes)} ops alone", len(nodes)) as advance:
            for node in nodes:
                _add_node(graph, model, node, repeats)
                advance()
    else:
        for node in nodes:
            _add_node(graph, model, node, repeats)
    for name, p in graph.module.named_parameters():
        model.params[name] = p.numel()
        model.shapes[name] = tuple(p.shape)
    if kind == "latency" and model.per_node and not graph.example.args:
        # ops timed alone miss what running the model adds (module calls, hooks, dispatch); spread the
        # measured difference over the nodes: removing a block saves its nodes' share, narrowing does not
        whole = measure_latency(graph.module, graph.example, repeats)
        model.overhead = max(0.0, whole - sum(model.per_node.values())) / len(model.per_node)
    return model


def candidate_cost(costs: CostModel, cand: Candidate, module: nn.Module | None = None) -> float:
    """Return what removing `cand` saves under `costs` (seconds, FLOPs or parameters)."""
    if cand.level == "block":
        if costs.kind == "params":
            prefix = cand.block + "."
            return float(sum(n for name, n in costs.params.items() if name.startswith(prefix)))
        return sum(costs.per_node[n] + costs.overhead for n in costs.module_nodes.get(cand.block, []))
    removed: dict[tuple[str, int], set[int]] = {}
    for unit in cand.units:
        for key, idx in unit.slices.items():
            removed.setdefault(key, set()).update(idx)
    saved = 0.0
    for (name, dim), idx in removed.items():
        if name not in costs.shapes:
            continue  # a buffer: no parameters, no timed node of its own
        fraction = len(idx) / costs.shapes[name][dim]
        if costs.kind == "params":
            saved += fraction * costs.params[name]
        elif name.endswith(".weight"):
            saved += fraction * sum(costs.per_node[n] for n in costs.layer_nodes.get(name[: -len(".weight")], []))
    if cand.level == "head" and costs.kind != "params" and cand.family is not None:
        share = len(cand.units) / len(cand.family.units)
        saved += share * sum(costs.per_node[n] for n in costs.attention_nodes.get(cand.family.host, []))
    if costs.other_nodes:
        for unit in cand.units:
            saved += sum(share * costs.per_node[n] for n, share in unit.footprint.items() if n in costs.other_nodes)
    return saved
