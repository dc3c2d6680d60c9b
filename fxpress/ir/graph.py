"""`Graph`: a captured model (FX graph from torch.export) plus typed annotations per layer."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import fx, nn

from fxpress.ir.annotations import LayerAnnotation
from fxpress.ir.layers import Layer, find_layers

META_KEY = "fxpress"


@dataclass
class Inputs:
    """Positional and keyword arguments for one call of the model."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: Any) -> Inputs:
        """Normalise inputs given as Inputs, an object with .args/.kwargs, a kwargs dict, a tensor or a tuple."""
        if isinstance(value, Inputs):
            return value
        if hasattr(value, "args") and hasattr(value, "kwargs"):
            return cls(tuple(value.args), dict(value.kwargs))
        if isinstance(value, dict):
            return cls((), dict(value))
        if isinstance(value, torch.Tensor):
            return cls((value,), {})
        return cls(tuple(value), {})

    @property
    def batch_size(self) -> int | None:
        """The batch: the first dim of the first tensor of two or more dims (None when there is none)."""
        tensors = [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 1]
        return tensors[0].shape[0] if tensors else None

    def with_batch(self, size: int) -> Inputs:
        """Return these inputs with every tensor that has the batch axis (see `batch_size`) repeated along
        it to `size` rows."""
        batch = self.batch_size
        if batch is None:
            return self

        def tile(value: Any) -> Any:
            if not isinstance(value, torch.Tensor) or not value.dim() or value.shape[0] != batch:
                return value
            return value.repeat(-(-size // batch), *[1] * (value.dim() - 1))[:size]

        return Inputs(tuple(tile(v) for v in self.args), {k: tile(v) for k, v in self.kwargs.items()})


class Graph:
    """A captured model: the runnable `module`, its FX `graph_module`, and the layer view.

    Transform passes replace submodules of `module` (never tensors in place) and record what they
    did as annotations on the graph nodes of each layer.
    """

    def __init__(self, module: nn.Module, graph_module: fx.GraphModule, param_names: dict[str, str],
                 example: Inputs, calibration: list[Inputs] | None = None,
                 source: dict[str, Any] | None = None, input_names: list[str] | None = None,
                 buffer_names: dict[str, str] | None = None):
        self.module = module
        self.graph_module = graph_module
        self.param_names = param_names
        self.buffer_names = buffer_names or {}  # placeholder -> buffer or lifted-constant name
        self.example = example
        self.calibration = calibration or [example]
        self.source = source or {}
        self.input_names = input_names or []
        self.provided: set[str] = {"layers"}
        self.extras: dict[str, Any] = {}
        self.layers: dict[str, Layer] = find_layers(graph_module.graph, param_names, self.buffer_names)

    def nodes_of(self, path: str) -> list[fx.Node]:
        """Return the graph nodes that call layer `path`."""
        by_name = self.__dict__.get("_by_name")
        if by_name is None or by_name[0] is not self.graph_module.graph:
            by_name = (self.graph_module.graph, {n.name: n for n in self.graph_module.graph.nodes})
            self._by_name = by_name
        return [by_name[1][name] for name in self.layers[path].nodes]

    def annotation(self, path: str) -> LayerAnnotation:
        """Return (creating if needed) the annotation of layer `path`, kept in node.meta."""
        nodes = self.nodes_of(path)
        ann = nodes[0].meta.get(META_KEY)
        if ann is None:
            ann = LayerAnnotation()
            for node in nodes:
                node.meta[META_KEY] = ann
        return ann

    def annotations(self) -> dict[str, LayerAnnotation]:
        """Return the annotation of every layer, keyed by module path."""
        return {path: self.annotation(path) for path in self.layers}

    def copy(self) -> Graph:
        """Return an independent copy: module, FX graph and annotations are all duplicated."""
        anns = {p: copy.deepcopy(a) for p, a in self.annotations().items()}
        new = Graph.__new__(Graph)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_by_name"})
        new.module = copy.deepcopy(self.module)
        new.graph_module = copy.deepcopy(self.graph_module)
        new.layers = copy.deepcopy(self.layers)
        new.provided = set(self.provided)
        new.extras = copy.deepcopy(self.extras)
        for path, ann in anns.items():
            for node in new.nodes_of(path):
                node.meta[META_KEY] = ann
        return new

    @classmethod
    def from_export(cls, module: nn.Module, exported: Any, example: Inputs, calibration: list[Inputs] | None = None,
                    source: dict[str, Any] | None = None) -> Graph:
        """Return the Graph of `module` from its torch.export ExportedProgram."""
        sig = exported.graph_signature
        return cls(module, exported.graph_module, dict(sig.inputs_to_parameters), example, calibration, source,
                   list(sig.user_inputs), {**sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants})

    def recapture(self, module: nn.Module, example: Inputs | None = None) -> Graph:
        """Return a new Graph of `module` (say, this model after a structural edit) exported on `example`
        (this Graph's example inputs by default); calibration, source and extras carry
        over, annotations do not."""
        example = self.example if example is None else example
        exported = torch.export.export(module, tuple(example.args), dict(example.kwargs), strict=False)
        new = Graph.from_export(module, exported, example, self.calibration, self.source)
        new.extras = copy.deepcopy(self.extras)
        return new

    @torch.no_grad()
    def run(self, inputs: Inputs | None = None) -> Any:
        """Run the module on `inputs` (the example inputs by default)."""
        inputs = inputs or self.example
        return self.module(*inputs.args, **inputs.kwargs)

    def profile(self, console: Console | None = None) -> Table:
        """Print (and return) the per-layer table: kind, shapes, params, FLOPs, bytes, annotations."""
        table = Table(title=f"{type(self.module).__name__}: {len(self.layers)} weight-bearing layers")
        for col in ("layer", "kind", "weight", "params", "in", "out", "MFLOPs", "MB", "bits"):
            table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
        for path, layer in self.layers.items():
            ann = self.annotation(path)
            bits = ann.quant.key if ann.quant else (ann.keep_reason or "-")
            table.add_row(path, layer.kind, "x".join(map(str, layer.weight_shape)), f"{layer.params:,}",
                          "x".join(map(str, layer.in_shape)), "x".join(map(str, layer.out_shape)),
                          f"{layer.flops / 1e6:,.1f}", f"{layer.bytes / 1e6:,.2f}", bits)
        total = sum(layer.params for layer in self.layers.values())
        table.caption = (f"{total:,} params in layers, {sum(p.numel() for p in self.module.parameters()):,}"
                         f" in the model, {sum(la.flops for la in self.layers.values()) / 1e9:,.2f} GFLOPs")
        (console or Console()).print(table)
        return table


def output_tensors(output: Any) -> list[torch.Tensor]:
    """Flatten a model output (tensor, tuple, dict or diffusers/transformers output) to tensors."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in output_tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in output_tensors(v)]
    if hasattr(output, "to_tuple"):
        return output_tensors(output.to_tuple())
    return []
