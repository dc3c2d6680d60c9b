"""Guidance as an input: a zero-initialised guidance-weight embedding added where the time embedding leaves.

Guidance distillation (Meng et al.) folds classifier-free guidance into the network: the student takes
the guidance weight w as an input, embedded like the timestep, and learns to give in one call what the
teacher gives in two. `guidance_site` finds, in the captured graph, the module whose single (batch,
width) output carries all the timestep information on to the rest of the model (a UNet's
`time_embedding`, a PixArt DiT's `adaln_single.emb`); `GuidanceConditioned` adds the embedding of w to
that output. Its last layer starts at zero, so at insertion the model's outputs are bit-identical.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn

from fxpress.errors import PassError
from fxpress.ir.dataflow import input_dependencies, module_nodes, module_outputs, timestep_only_modules
from fxpress.ir.graph import Graph
from fxpress.passes.module_edit import timestep_input

GUIDANCE_INPUT = "guidance"


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


class GuidanceEmbedding(nn.Module):
    """w -> sinusoidal features of w * `scale` -> Linear -> SiLU -> Linear (zero-initialised) of `width`."""

    def __init__(self, width: int, features: int = 64, scale: float = 100.0):
        super().__init__()
        self.features, self.scale = features, scale
        self.linear_1 = nn.Linear(features, width)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(width, width)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, guidance: torch.Tensor) -> torch.Tensor:
        half = self.features // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=guidance.device) / half)
        angles = guidance.float().reshape(-1, 1) * self.scale * freqs
        return self.linear_2(self.act(self.linear_1(torch.cat([angles.sin(), angles.cos()], dim=1))))


class _Slot:
    """The guidance of the current call, shared by the wrapper and the embedding site."""

    value: torch.Tensor | None = None


class WithGuidance(nn.Module):
    """Runs the original time-embedding module and adds the guidance embedding of the current call."""

    def __init__(self, inner: nn.Module, embedding: GuidanceEmbedding, slot: _Slot):
        super().__init__()
        self.inner, self.embedding, self.slot = inner, embedding, slot

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.inner(*args, **kwargs)
        w = self.slot.value
        if w is None:
            return out
        return out + self.embedding(w.expand(out.shape[0]) if w.dim() == 0 else w).to(out.dtype)


class GuidanceConditioned(nn.Module):
    """`model` taking one more keyword, `guidance` (a (batch,) or scalar tensor of guidance weights).

    Without it the model runs as before; `site` is the module path the embedding is added to.
    """

    def __init__(self, model: nn.Module, site: str, width: int, features: int = 64, scale: float = 100.0):
        super().__init__()
        self.site, self.settings = site, {"width": width, "features": features, "scale": scale}
        self.model = model
        slot = _Slot()
        self._slot = slot
        parent, _, leaf = site.rpartition(".")
        host = model.get_submodule(parent) if parent else model
        original = getattr(host, leaf)
        setattr(host, leaf, WithGuidance(original, GuidanceEmbedding(width, features, scale), slot))

    @property
    def embedding(self) -> GuidanceEmbedding:
        return self.model.get_submodule(self.site).embedding

    def forward(self, *args: Any, guidance: torch.Tensor | None = None, **kwargs: Any) -> Any:
        self._slot.value = guidance
        try:
            return self.model(*args, **kwargs)
        finally:
            self._slot.value = None

    def describe(self) -> dict[str, Any]:
        """Return what an artifact records to rebuild this wrapper (`site` and the embedding's settings)."""
        return {"kind": "guidance_input", "site": self.site, **self.settings}
