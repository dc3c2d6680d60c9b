"""Where guidance enters a captured model: the time-embedding module that a guidance embedding is added to.

`guidance_site` finds, in the captured graph, the module whose single (batch, width) output carries all
the timestep information on to the rest of the model (a UNet's `time_embedding`, a PixArt DiT's
`adaln_single.emb`), from data flow alone; `kernels.guidance.GuidanceConditioned` adds the embedding there.
"""

from __future__ import annotations

import torch
from torch import fx

from fxpress.errors import PassError
from fxpress.ir.dataflow import input_dependencies, module_nodes, module_outputs, timestep_only_modules
from fxpress.ir.graph import Graph
from fxpress.passes.module_edit import timestep_input


def _single_output(gm: fx.GraphModule, path: str) -> fx.Node | None:
    outs = module_outputs(gm.graph, path)
    if len(outs) != 1:
        return None
    val = outs[0].meta.get("val")
    return outs[0] if isinstance(val, torch.Tensor) and val.dim() == 2 else None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def guidance_site(graph: Graph) -> tuple[str, int]:
    """Return (module path, width) of the time embedding the guidance embedding is added to.

    That is the timestep-only module (see `timestep_only_modules`) whose one (batch, width) output every
    timestep-only result used elsewhere derives from, searched from the outermost inwards. Raises
    PassError when the model has no timestep input or no such module.
    """
    t_name = timestep_input(graph.input_names)
    if t_name is None:
        raise PassError(f"no timestep input among {graph.input_names}: guidance is embedded beside the "
                        "timestep, so the model must take one", "GuidanceDistill")
    gm = graph.graph_module
    layer_nodes = {n for layer in graph.layers.values() for n in layer.nodes}
    outer = timestep_only_modules(gm.graph, graph.input_names, t_name, layer_nodes)
    deps = input_dependencies(gm.graph, graph.input_names)
    members = module_nodes(gm.graph)
    for top in outer:
        exits = module_outputs(gm.graph, top)
        inner = sorted((p for p in members if p == top or p.startswith(top + ".")), key=lambda p: p.count("."))
        for path in inner:
            node = _single_output(gm, path)
            if node is None or deps[node] != frozenset({t_name}):
                continue
            if all(node in _ancestors(e) for e in exits):
                return path, int(node.meta["val"].shape[-1])
    raise PassError("found no time-embedding module with one (batch, width) output to add a guidance "
                    f"embedding to (timestep-only modules: {outer or 'none'})", "GuidanceDistill")
