"""`CacheTimeEmbedding`: replace the timestep-only time-embedding module by a table, bit-exactly."""

from __future__ import annotations

import torch
from torch import fx

from fxpress.errors import PassError
from fxpress.ir.dataflow import module_outputs, timestep_only_modules
from fxpress.ir.graph import Graph, output_tensors
from fxpress.kernels.timestep_table import TimestepTable, install_feeder
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.module_edit import replace_submodule, timestep_input


def _timestep_subgraph(gm: fx.GraphModule, t_name: str, outputs: list[fx.Node]) -> tuple[fx.GraphModule, list[str]]:
    """Return a GraphModule computing `outputs` from the timestep and the parameters it needs."""
    needed: set[fx.Node] = set()
    todo = list(outputs)
    while todo:
        node = todo.pop()
        if node not in needed:
            needed.add(node)
            todo.extend(node.all_input_nodes)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders: list[str] = []
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = sub.node_copy(node, lambda n: env[n])
            if node.op == "placeholder":
                placeholders.append(node.name)
    sub.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, sub), placeholders


class CacheTimeEmbedding(Pass):
    """Precompute the time embedding for every timestep of a grid and replace it by a lookup table.

    The time embedding is found structurally: the outermost module holding a layer whose computation
    depends only on the timestep input and whose result feeds several consumers. The cached model's
    outputs must equal the original's bit for bit, or the pass fails. With `max_table_ratio`, a module
    whose table would exceed that multiple of its weights' fp16 bytes is left alone (and reported).
    """

    provides = ("time_cache",)
    transforms = True

    def __init__(self, timesteps: list[int] | None = None, timestep_name: str | None = None,
                 max_table_ratio: float | None = None):
        self.timesteps = list(range(1000)) if timesteps is None else sorted(set(timesteps))
        self.timestep_name = timestep_name
        self.max_table_ratio = max_table_ratio

    def run(self, graph: Graph) -> PassResult:
        t_name = timestep_input(graph.input_names, self.timestep_name)
        if t_name is None:
            return PassResult(graph, False, {"skipped": "the model has no timestep input"})
        layer_nodes = {n for layer in graph.layers.values() for n in layer.nodes}
        gm = graph.graph_module
        paths = timestep_only_modules(gm.graph, graph.input_names, t_name, layer_nodes)
        if not paths:
            return PassResult(graph, False, {"skipped": "no shared timestep-only module"})
        example_t = graph.example.kwargs.get(t_name)
        if not isinstance(example_t, torch.Tensor) or example_t.dim() != 1:
            return PassResult(graph, False, {"skipped": f"{t_name!r} must be a 1-D tensor in the example"})
        reference = graph.run()
        params = dict(graph.module.named_parameters()) | dict(graph.module.named_buffers())
        cached: dict[str, dict] = {}
        skipped: dict[str, str] = {}
        for path in paths:
            outs = module_outputs(gm.graph, path)
            sub, names = _timestep_subgraph(gm, t_name, outs[:1])
            grid = torch.tensor(self.timesteps, dtype=example_t.dtype)
            rows = []
            with torch.no_grad():
                for value in grid:
                    feed = [example_t.new_full(example_t.shape, value) if n == t_name
                            else params[graph.param_names.get(n, n)] for n in names]
                    rows.append(sub(*feed)[0][:1].clone())
            table = torch.cat(rows)
            weight_bytes = 2 * sum(p.numel() for p in graph.module.get_submodule(path).parameters())
            table_bytes = table.numel() * table.element_size()
            if self.max_table_ratio is not None and table_bytes > self.max_table_ratio * weight_bytes:
                skipped[path] = f"table {table_bytes:,} B > {self.max_table_ratio} x fp16 weights {weight_bytes:,} B"
                continue
            old = replace_submodule(graph.module, path, TimestepTable(grid, table))
            cached[path] = {"table_shape": list(table.shape), "table_bytes": table_bytes,
                            "params_removed": sum(p.numel() for p in old.parameters())}
        if not cached:
            return PassResult(graph, False, {"skipped": skipped})
        install_feeder(graph.module, t_name)
        for path in graph.layers:
            if any(path.startswith(c + ".") for c in cached):
                graph.annotation(path).keep_reason = "time-cache"
        after = graph.run()
        if not all(torch.equal(a, b) for a, b in zip(output_tensors(reference), output_tensors(after))):
            raise PassError("cached time embedding is not bit-exact", self.name, module_path=", ".join(cached))
        graph.extras["time_cache"] = {"timestep_input": t_name, "modules": sorted(cached)}
        grid = [self.timesteps[0], self.timesteps[-1], len(self.timesteps)]
        return PassResult(graph, True, {"cached": cached, "skipped": skipped, "grid": grid})
