"""Local error of a head or channel candidate: what masking it changes at the layers that read it.

Masking a unit zeroes the input columns of every linear or conv layer that reads its channels, so
each such layer's output moves by exactly the product of those columns with their activations. The
local score of a candidate is that change's mean square over the layer output's mean square, summed
over the layers, averaged over the inputs: one forward per input scores every candidate at once (KD
scoring runs one forward per input per candidate). It orders the units within a family; it does not
compare families, whose prices stay KD losses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxpress.passes.prune.candidates import Candidate
from fxpress.passes.prune.remove import consumer_columns

LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def _change(layer: nn.Module, x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Return what zeroing `columns` of the layer's weight takes away from its output on `x` (bias aside)."""
    weight = layer.weight.index_select(1, columns)
    if isinstance(layer, nn.Linear):
        return F.linear(x.index_select(-1, columns), weight)
    return layer._conv_forward(x.index_select(1, columns), weight, None)


def _linear_changes(layer: nn.Linear, x: torch.Tensor, columns: list[torch.Tensor]) -> torch.Tensor:
    """Return the mean square of each `_change` of a linear layer, for many column sets at once.

    ||X_s W_s^T||^2 is the sum of (X_s^T X_s) * (W_s^T W_s): two small batched Gram matrices per set
    instead of each set's whole output change (each set padded to the largest with a zero column).
    """
    rows = x.reshape(-1, x.shape[-1])
    width = max(len(c) for c in columns)
    index = torch.full((len(columns), width), rows.shape[1], dtype=torch.long)
    for i, cols in enumerate(columns):
        index[i, : len(cols)] = cols
    rows = torch.cat([rows, rows.new_zeros(rows.shape[0], 1)], 1)
    weight = layer.weight.float()
    weight = torch.cat([weight, weight.new_zeros(weight.shape[0], 1)], 1)
    xs = rows[:, index].permute(1, 2, 0)  # sets, width, rows
    ws = weight[:, index].permute(1, 2, 0)  # sets, width, outputs
    energy = (torch.bmm(xs, xs.transpose(1, 2)) * torch.bmm(ws, ws.transpose(1, 2))).sum((1, 2))
    return energy.clamp_min(0.0) / (rows.shape[0] * weight.shape[0])


def _scorable(layer: nn.Module) -> bool:
    return isinstance(layer, LAYERS) and getattr(layer, "groups", 1) == 1


@torch.no_grad()
def local_scores(model: nn.Module, candidates: list[Candidate], inputs: list[dict[str, Any]]) -> dict[str, float]:
    """Return the local error of each head or channel candidate on `inputs` (keyword arguments of the
    model); candidates read by a layer this cannot score (a grouped conv) and blocks are left out."""
    layers = {id(m.weight): m for m in model.modules() if isinstance(m, LAYERS)}
    readers: dict[int, list[tuple[str, torch.Tensor]]] = {}  # layer id -> (candidate, columns it reads)
    for cand in candidates:
        if cand.level == "block":
            continue
        found = [(layers.get(id(weight)), columns) for weight, columns in consumer_columns(model, cand.units)]
        if not found or any(layer is None or not _scorable(layer) for layer, _ in found):
            continue
        for layer, columns in found:
            readers.setdefault(id(layer), []).append((cand.name, columns))
    scores = {name: 0.0 for entries in readers.values() for name, _ in entries}
    modules = {id(m): m for m in model.modules()}

    def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        energy = float(output.float().square().mean().clamp_min(1e-12))
        entries = readers[id(layer)]
        if isinstance(layer, nn.Linear):
            changes = _linear_changes(layer, args[0].float(), [columns for _, columns in entries]).tolist()
        else:
            changes = [float(_change(layer, args[0], columns).float().square().mean()) for _, columns in entries]
        for (name, _), change in zip(entries, changes):
            scores[name] += change / energy / len(inputs)

    handles = [modules[key].register_forward_hook(hook) for key in readers]
    try:
        for kwargs in inputs:
            model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return scores
