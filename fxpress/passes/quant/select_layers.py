"""`SelectLayers`: decide which layers get quantized; the rest keep high precision, with a reason."""

from __future__ import annotations

from torch import nn

from fxpress.errors import RecipeError
from fxpress.ir.dataflow import input_dependencies, timestep_only_modules
from fxpress.ir.graph import Graph
from fxpress.ir.select import Selector, closest_hint, select
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.module_edit import timestep_input

SPECIAL = ("first", "last", "time_embedding")


def layer_candidates(graph: Graph) -> dict[str, tuple[str, str]]:
    """{path: (module class name, layer kind)} of every weight-bearing layer, for `fxpress.ir.select`."""
    out = {}
    for path, layer in graph.layers.items():
        try:
            out[path] = (type(graph.module.get_submodule(path)).__name__, layer.kind)
        except AttributeError:  # replaced since capture (a cached time embedding is a table now)
            continue
    return out


def resolve_keep(graph: Graph, keep: list[str]) -> dict[str, str]:
    """Map each layer matched by `keep` to the entry that matched it.

    Entries are layer selectors (`fxpress.ir.select`; a bare entry is a module-path glob) or the
    structural names 'first' (the first layer on the path of the
    model's first input), 'last' (the last layer run) and 'time_embedding' (layers of the shared
    timestep-only module). Raises RecipeError for an entry that matches no layer.
    """
    order = list(graph.layers)
    nodes = {n.name: n for n in graph.graph_module.graph.nodes}
    deps = input_dependencies(graph.graph_module.graph, graph.input_names)
    matched: dict[str, str] = {}
    for entry in keep:
        if entry == "first":
            first_input = graph.input_names[0] if graph.input_names else None
            hits = [p for p in order if first_input in deps[nodes[graph.layers[p].nodes[0]]]][:1]
        elif entry == "last":
            hits = order[-1:]
        elif entry == "time_embedding":
            t_name = timestep_input(graph.input_names)
            cached = graph.extras.get("time_cache", {}).get("modules", [])
            layer_nodes = {n for layer in graph.layers.values() for n in layer.nodes}
            mods = cached or (timestep_only_modules(graph.graph_module.graph, graph.input_names, t_name,
                                                    layer_nodes) if t_name else [])
            hits = [p for p in order if any(p.startswith(m + ".") for m in mods)]
            if not t_name:
                continue  # a model without a timestep has no time embedding to keep
        else:  # the project's one layer selector (fxpress.ir.select); a bare entry is a glob here
            candidates = layer_candidates(graph)
            hits = list(select([entry], candidates, default="glob", require_each=False))
            if not hits:
                hint = closest_hint(Selector.parse(entry, "glob"), candidates)
                raise RecipeError(f"keep entry {entry!r} matches no layer; {hint}")
        for path in hits:
            matched.setdefault(path, entry)
    return matched


class SelectLayers(Pass):
    """Mark layers to keep in high precision (by `keep`) or that cannot be quantized; provides 'selection'."""

    provides = ("selection",)

    def __init__(self, keep: list[str] | None = None):
        self.keep = list(SPECIAL) if keep is None else list(keep)

    def run(self, graph: Graph) -> PassResult:
        kept = resolve_keep(graph, self.keep)
        reasons: dict[str, str] = {}
        for path in graph.layers:
            ann = graph.annotation(path)
            if ann.keep_reason:
                reasons[path] = ann.keep_reason
                continue
            module = graph.module.get_submodule(path)
            if path in kept:
                ann.keep_reason = f"keep:{kept[path]}"
            elif type(module) not in (nn.Linear, nn.Conv2d):
                ann.keep_reason = f"unsupported module {type(module).__name__}"
            elif isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros"
                                                    or isinstance(module.padding, str)):
                ann.keep_reason = "unsupported conv padding"
            if ann.keep_reason:
                reasons[path] = ann.keep_reason
        selected = [p for p in graph.layers if not graph.annotation(p).keep_reason]
        if not selected:
            raise RecipeError(f"no layer can be quantized: {_why_none(graph, reasons)}")
        return PassResult(graph, False, {"selected": len(selected), "kept": reasons,
                                         "selected_params": sum(graph.layers[p].weight_params for p in selected)})


def selected_layers(graph: Graph) -> list[str]:
    """Return the layers chosen for quantization, in execution order."""
    return [p for p in graph.layers if not graph.annotation(p).keep_reason]


def _why_none(graph: Graph, reasons: dict[str, str]) -> str:
    """Say why SelectLayers chose nothing: every layer kept (by which reason), or no supported layer at all."""
    if reasons:
        listed = "; ".join(f"{path}: {why}" for path, why in list(reasons.items())[:5])
        return (f"each of the model's {len(reasons)} linear/conv layers is kept or unsupported ({listed}); "
                "fxpress quantizes nn.Linear and zero-padded nn.Conv2d layers that keep does not name")
    weighted = [f"{name or '<root>'} ({type(m).__name__})" for name, m in graph.module.named_modules()
                if any(True for _ in m.parameters(recurse=False))]
    found = ", ".join(weighted[:5]) if weighted else "none"
    return (f"{type(graph.module).__name__} has no nn.Linear or nn.Conv2d layer fxpress can quantize "
            f"(modules with weights: {found})")
