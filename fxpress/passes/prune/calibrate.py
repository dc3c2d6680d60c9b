"""Measured corrections to the latency model: narrow or shorten a copy of the model for real and time it.

Ops timed one by one say what a layer costs, not what narrowing it saves: much of a small op's time
is fixed (dispatch, kernel start), and a model that spends most of its forward in Python saves little
by narrowing. So each round the scheduler removes about half of every family's candidates from one
copy and half of the removable blocks from another, times both in turns with the model, and scales
the modelled savings of width candidates (heads, channels) and of blocks by measured over modelled.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fxpress.errors import PassError
from fxpress.ir.dependency import Family, Unit
from fxpress.ir.graph import Inputs
from fxpress.passes.prune.bypass import StreamArg, bypass_blocks
from fxpress.passes.prune.candidates import Candidate
from fxpress.passes.prune.costs import latencies_in_turns
from fxpress.passes.prune.moves import removable_prefix
from fxpress.passes.prune.remove import remove_units

FACTOR_RANGE = (0.02, 2.0)


def _half_of_each_family(cands: list[Candidate]) -> list[Candidate]:
    by_family: dict[str, list[Candidate]] = {}
    for cand in cands:
        if cand.family is not None:
            by_family.setdefault(cand.family.name, []).append(cand)
    return [cand for members in by_family.values() for cand in removable_prefix(members[: len(members) // 2])]


def _factor(saved_fraction: float, modelled_fraction: float) -> float:
    low, high = FACTOR_RANGE
    return min(max(saved_fraction / modelled_fraction, low), high) if modelled_fraction > 0 else 1.0


def latency_factors(model: nn.Module, cands: list[Candidate], saved: dict[str, float], total: float,
                    streams: dict[str, StreamArg], inputs: Inputs, turns: int) -> dict[str, float]:
    """Return measured over modelled latency saving for each level ('block', 'head', 'channel'; heads
    and channels share one width factor). `saved`: modelled seconds per candidate; `total`: the
    modelled seconds of the whole model."""
    width = _half_of_each_family(cands)
    blocks = [c for c in cands if c.level == "block"][::2]
    copies, modelled = [model], []
    if width:
        narrow = copy.deepcopy(model)
        removals: dict[str, tuple[Family, list[Unit]]] = {}
        for cand in width:
            assert cand.family is not None
            removals.setdefault(cand.family.name, (cand.family, []))[1].extend(cand.units)
        try:
            remove_units(narrow, list(removals.values()))
            with torch.no_grad():
                narrow(*inputs.args, **inputs.kwargs)
            copies.append(narrow)
            modelled.append(("width", sum(saved[c.name] for c in width) / total))
        except (PassError, RuntimeError):
            pass  # narrowing every family at once is refused or breaks the model: keep the modelled costs
    if blocks:
        short = copy.deepcopy(model)
        bypass_blocks(short, {c.block: streams[c.block] for c in blocks})
        copies.append(short)
        modelled.append(("block", sum(saved[c.name] for c in blocks) / total))
    if len(copies) == 1:
        return {"block": 1.0, "head": 1.0, "channel": 1.0}
    times = latencies_in_turns(copies, inputs, turns)
    factors = {kind: _factor(1.0 - t / times[0], share) for (kind, share), t in zip(modelled, times[1:])}
    width_factor = factors.get("width", 1.0)
    return {"block": factors.get("block", 1.0), "head": width_factor, "channel": width_factor}
