"""Pruning candidates at three levels (whole blocks, attention heads, groups of channels), and masks.

A candidate is what the scheduler scores and removes in one go. Heads and blocks are candidates as
they are; the units of a channel family (FFN channels, GroupNorm groups, stream channels) are put in
order of weight magnitude and cut into groups of about `channel_group` channels, so that a model with
thousands of channels is scored in hundreds of forwards, not thousands.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fxpress.ir.dependency import DependencyGroups, Family, Unit
from fxpress.passes.prune.bypass import StreamArg, bypass_hooks
from fxpress.passes.prune.remove import consumer_columns

LEVELS = ("block", "head", "channel")


@dataclass(frozen=True)
class Candidate:
    """Something to remove: a block (by path) or some units of one dependency family."""

    name: str
    level: str  # "block", "head" or "channel"
    family: Family | None = None
    units: tuple[Unit, ...] = ()
    block: str = ""


def unit_magnitude(tensors: dict[str, torch.Tensor], unit: Unit, scales: dict[str, float] | None = None) -> float:
    """Return the mean squared value of the slices a unit removes (`tensors`: parameters and buffers by name);
    with `scales` (a cache, filled as needed) each slice is divided by its whole tensor's mean square, so
    tensors of any scale compare."""
    total, count = 0.0, 0
    for (name, dim), idx in unit.slices.items():
        tensor = tensors[name].detach()
        part = tensor.index_select(dim, torch.tensor(idx)).float()
        scale = 1.0
        if scales is not None:
            if name not in scales:
                scales[name] = float(tensor.float().square().mean())
            scale = scales[name]
        total += float(part.square().sum()) / max(scale, 1e-30)
        count += part.numel()
    return total / max(count, 1)


def touches(family: Family, layers: tuple[str, ...]) -> bool:
    """Return whether removing units of `family` would change a tensor of one of the layers (module paths)."""
    owners = {name.rpartition(".")[0] for unit in family.units for name, _ in unit.slices}
    return any(owner == layer or owner.startswith(layer + ".") for owner in owners for layer in layers)


def build_candidates(model: nn.Module, groups: DependencyGroups, blocks: list[str], *,
                     levels: tuple[str, ...] = LEVELS, channel_group: int = 16,
                     protected: tuple[str, ...] = ()) -> list[Candidate]:
    """Return the candidates of the requested levels; channel units are grouped by magnitude order.

    Nothing that would remove or narrow a `protected` layer (module paths) is a candidate: no block
    holding one, no head or channel family whose units reach into one.
    """
    out: list[Candidate] = []
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    if "block" in levels:
        out += [Candidate(f"block {path}", "block", block=path) for path in blocks
                if not any(layer == path or layer.startswith(path + ".") for layer in protected)]
    for family in groups.families:
        if protected and touches(family, protected):
            continue
        if family.kind == "head":
            if "head" in levels:
                out += [Candidate(f"{family.name} #{i}", "head", family, (u,)) for i, u in enumerate(family.units)]
            continue
        if "channel" not in levels:
            continue
        per = max(1, channel_group // max(family.units[0].width, 1))
        ordered = sorted(family.units, key=lambda u: unit_magnitude(tensors, u))
        for start in range(0, len(ordered), per):
            chunk = tuple(ordered[start:start + per])
            out.append(Candidate(f"{family.name} [{start}:{start + len(chunk)}]", "channel", family, chunk))
    return out


@contextlib.contextmanager
def masked(model: nn.Module, candidates: list[Candidate], streams: dict[str, StreamArg]) -> Iterator[None]:
    """Within the block, `model` behaves as if `candidates` were removed (restored on exit)."""
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    handles = bypass_hooks(model, {c.block: streams[c.block] for c in candidates if c.level == "block"})
    try:
        with torch.no_grad():
            for weight, columns in consumer_columns(model, [u for c in candidates for u in c.units]):
                saved.append((weight, columns, weight.index_select(1, columns).clone()))
                weight.index_fill_(1, columns, 0.0)
        yield
    finally:
        with torch.no_grad():
            for weight, columns, values in reversed(saved):
                weight.index_copy_(1, columns, values)
        for handle in handles:
            handle.remove()
