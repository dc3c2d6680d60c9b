"""Dependency groups: the parameter slices that must shrink together, found on the captured graph.

`dependency_groups(graph)` follows channel labels through the graph (see channel_labels.py) and
returns prunable units grouped in families (the heads of one attention, the hidden channels of one
FFN, the GroupNorm groups between two convs, the channels of a residual stream), plus, for every
layer whose output channels cannot be pruned, the reason: they reach the model's output, they are
normalised together by a LayerNorm, or they pass through an op fxpress cannot follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch

from fxpress.ir.channel_labels import FIXED, LabelSpace, propagate
from fxpress.ir.graph import Graph

Slices = dict[tuple[str, int], tuple[int, ...]]  # (parameter or buffer name, dim) -> indices to remove


@dataclass(frozen=True)
class Unit:
    """One removable unit: the indices to remove from each (parameter or buffer, dim)."""

    slices: Slices
    kind: str  # "head", "group" (GroupNorm group) or "channel"
    # node name -> share of that node's output elements the unit's channels occupy (when asked for)
    footprint: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def width(self) -> int:
        """How many channels the unit removes from its widest slice (a head's head_dim, a group's size)."""
        return max(len(idx) for idx in self.slices.values())


@dataclass
class Family:
    """Units that remove slices of the same parameters (the 4 heads of one attention, say)."""

    name: str
    kind: str
    units: list[Unit]
    host: str = ""  # for heads: the module that holds the head count
    params: tuple[tuple[str, int], ...] = ()  # the (name, dim) every unit slices


@dataclass
class DependencyGroups:
    """Families of prunable units, and the layers whose output channels cannot be pruned (with why)."""

    families: list[Family] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)

    def family(self, name: str) -> Family:
        """Return the family called `name`; raises KeyError listing a few known ones."""
        for fam in self.families:
            if fam.name == name:
                return fam
        raise KeyError(f"no family {name!r}; families look like {[f.name for f in self.families[:4]]}")

    def of_kind(self, kind: str) -> list[Family]:
        """Return the families of one kind: 'head', 'group' or 'channel'."""
        return [f for f in self.families if f.kind == kind]


def _slices(labels: list[int], space: LabelSpace, biases: set[str]) -> Slices | str:
    """Return the slices of a component, or a reason string when it is not a set of whole slices."""
    picks: dict[tuple[str, int], set[int]] = {}
    elems: dict[str, list[int]] = {}
    for label in labels:
        kind, name, index = space.decode(label)
        if kind == "out":
            picks.setdefault((f"{name}.weight", 0), set()).add(index)
            if f"{name}.bias" in biases:
                picks.setdefault((f"{name}.bias", 0), set()).add(index)
        elif kind == "in":
            picks.setdefault((f"{name}.weight", 1), set()).add(index)
        else:
            elems.setdefault(name, []).append(index)
    for name, flat in elems.items():
        shape = space.shapes[name]
        mask = torch.zeros(shape, dtype=torch.bool).reshape(-1)
        mask[torch.tensor(flat)] = True
        mask = mask.reshape(shape)
        for dim in range(len(shape)):
            others = [d for d in range(len(shape)) if d != dim]
            hit = mask.any(dim=others) if others else mask
            idx = torch.nonzero(hit).reshape(-1)
            full = torch.zeros(shape, dtype=torch.bool)
            full.index_fill_(dim, idx, True)
            if torch.equal(full, mask):
                picks.setdefault((name, dim), set()).update(idx.tolist())
                break
        else:
            return f"{name} is coupled element by element, not by whole slices"
    return {key: tuple(sorted(idx)) for key, idx in sorted(picks.items())}


def _fill_footprints(units: list[tuple[Unit, list[int]]], footprints: dict, size: int) -> None:
    """Give each unit the share of every node's output elements that carry its labels."""
    owner = torch.full((size,), -1, dtype=torch.long)
    for index, (_, labels) in enumerate(units):
        owner[torch.tensor(labels)] = index
    for node, (found, counts, numel) in footprints.items():
        ids = owner[found]
        keep = ids >= 0
        if not bool(keep.any()):
            continue
        per_unit = torch.zeros(len(units), dtype=torch.long).index_add_(0, ids[keep], counts[keep])
        for index in torch.nonzero(per_unit).reshape(-1).tolist():
            units[index][0].footprint[node] = float(per_unit[index]) / numel


def dependency_groups(graph: Graph, footprints: bool = False) -> DependencyGroups:
    """Return the prunable units of `graph` grouped in families, and the refused layers with reasons.

    With `footprints`, each unit also records the share of every node's output it occupies (what a
    latency model needs to know which ops shrink when the unit goes).
    """
    layer_params = {f"{p}.weight" for p in graph.layers} | {f"{p}.bias" for p, la in graph.layers.items()
                                                            if la.has_bias}
    names = {**graph.param_names, **graph.buffer_names}
    prop = propagate(graph.graph_module, names, graph.input_names, layer_params, footprints)
    biases = {p for p in layer_params if p.endswith(".bias")}
    sizes = {(kind, name): size for (kind, name), (_, size) in prop.space.blocks.items()}
    result = DependencyGroups()
    families: dict[tuple, Family] = {}
    decoded = {x: prop.space.decode(x) for x in prop.couplings.nodes if x != FIXED}
    made: list[tuple[Unit, list[int]]] = []
    for component in nx.connected_components(prop.couplings):
        labels = sorted(component)
        outs = sorted({decoded[x][1] for x in labels if x != FIXED and decoded[x][0] == "out"})
        if FIXED in component:
            anywhere = next((prop.reasons[x] for x in labels if x in prop.reasons), "tied to the model's inputs")
            own: dict[str, str] = {}
            for x in labels:
                kind, name, _ = decoded.get(x, ("", "", 0))
                if kind == "out" and x in prop.reasons:
                    own.setdefault(name, prop.reasons[x])
            for path in outs:
                result.refused.setdefault(path, own.get(path, anywhere))
            continue
        if not outs:
            continue  # only inputs of layers or constants: nothing produces these channels
        tags = {t for x in labels for t in prop.tags.get(x, ())}
        counts = {p: sum(decoded[x][:2] == ("out", p) for x in labels) for p in outs}
        if any(counts[p] == sizes[("out", p)] for p in outs):
            mixed = sorted(t.split("@")[1] for t in tags if t.startswith(("layer_norm@", "softmax@", "reduce@")))
            why = (f"all of its channels are normalised or reduced together (node {mixed[0]})" if mixed
                   else "the only unit would remove every channel")
            for path in outs:
                result.refused.setdefault(path, why)
            continue
        slices = _slices(labels, prop.space, biases)
        if isinstance(slices, str):
            for path in outs:
                result.refused.setdefault(path, slices)
            continue
        heads = sorted(t for t in tags if t.startswith("heads:"))
        kind = "head" if heads else "group" if "group_norm" in tags else "channel"
        host = heads[0].split(":")[1] if heads else ""
        key = (kind, host, tuple(sorted(slices)))
        family = families.get(key)
        if family is None:
            name = f"heads of {host}" if heads else " + ".join(outs)
            taken = sum(f.name == name or f.name.startswith(name + " #") for f in families.values())
            name = f"{name} #{taken + 1}" if taken else name  # same producers, other slices: keep names unique
            family = families[key] = Family(name, kind, [], host, key[2])
        family.units.append(Unit(slices, kind))
        made.append((family.units[-1], labels))
    if footprints:
        _fill_footprints(made, prop.footprints, prop.space.next)
    for family in families.values():
        family.units.sort(key=lambda u: min(min(idx) for idx in u.slices.values()))
    result.families = sorted(families.values(), key=lambda f: f.name)
    return result
