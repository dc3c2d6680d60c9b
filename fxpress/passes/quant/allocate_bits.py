"""`AllocateBits`: choose a grid per layer that minimises total sensitivity under a bit or byte budget.

Cost of an option is log2(levels) bits per weight (a balanced 2-bit layer costs 2.32). The choice is
a multiple-choice knapsack solved by dynamic programming over a cost grid; costs are rounded up on
that grid, so the true average never exceeds the target, and the bits that rounding (or the
coarseness of the options) left unspent are then given to the upgrades that help most and still fit.
A target is a budget: any target from the narrowest option's cost up is met at or below it, and the
report says what was achieved. Each layer's score is its sensitivity divided by params**eta
(BitsFusion's parameter-size factor); within one grid a wider width never scores worse than a
narrower one (a measured inversion is noise between two near-zero errors).
"""

from __future__ import annotations

import json
import math

import numpy as np

from fxpress.errors import AllocationError
from fxpress.ir.annotations import QuantSpec
from fxpress.ir.graph import Graph
from fxpress.kernels.packing import radix_plan
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.quant.select_layers import selected_layers


def fixed_bytes(graph: Graph, quantized: list[str], storage_bytes: int = 2) -> int:
    """Bytes the artifact spends outside quantized weight codes: other floats at fp16 (time tables at
    their own precision), ints as is, per-channel scales, and an estimate of the manifest."""
    skip = {f"{p}.weight" for p in quantized}
    total = 0
    manifest = 4096  # format, source config, recipe, report
    for name, tensor in [*graph.module.named_parameters(), *graph.module.named_buffers()]:
        if name in skip:
            continue
        exact = name.endswith(".table")  # cached time embeddings keep their precision
        size = storage_bytes if tensor.is_floating_point() and not exact else tensor.element_size()
        total += tensor.numel() * size
        manifest += 3 * len(name) + 220  # manifest checksum and dtype entries, safetensors header entry
    for path in quantized:
        total += graph.layers[path].weight_shape[0] * storage_bytes
        manifest += 6 * len(path) + 700  # lowbit entry, checksum and header entries of codes/scale/counts
    annotations = json.dumps({p: a.to_json() for p, a in graph.annotations().items()}, separators=(",", ":"))
    return total + manifest + len(annotations)


def solve_allocation(params: np.ndarray, costs: np.ndarray, scores: np.ndarray, budget_bits: float,
                     resolution: float = 0.001, max_cells: int = 1 << 17) -> np.ndarray:
    """Return the option index per layer minimising sum(scores) with sum(params*costs) <= budget_bits.

    `costs` and `scores` are (layers, options). The dynamic programme runs over the budget above the
    cheapest choice, on a grid of `resolution` bits per weight (coarser if that needs more than
    `max_cells` cells); what the grid's rounding leaves unspent goes to `spend_slack`. Raises
    AllocationError when even the cheapest choice is over budget.
    """
    n_layers, _ = costs.shape
    total = float(params.sum())
    rows = np.arange(n_layers)
    cheapest = np.argmin(np.where(np.isfinite(scores), costs, np.inf), axis=1)
    floor_bits = float((params * costs[rows, cheapest]).sum())
    if floor_bits > budget_bits * (1 + 1e-12):
        raise AllocationError(f"the budget of {budget_bits / total:.4f} bits per weight is below the "
                              f"cheapest option ({floor_bits / total:.4f})")
    extra_bits = params[:, None] * (costs - costs[rows, cheapest][:, None])
    spare = budget_bits - floor_bits
    unit = max(resolution * total / n_layers, spare / max_cells, 1e-12)
    weights = np.ceil(extra_bits / unit - 1e-9).astype(np.int64)
    capacity = int(math.floor(spare / unit + 1e-9))
    best = np.zeros(capacity + 1)
    choice = np.zeros((n_layers, capacity + 1), dtype=np.int16)
    candidates = np.empty((costs.shape[1], capacity + 1))
    for layer in range(n_layers):
        candidates.fill(np.inf)  # candidates[o, c]: best score with option o for this layer and cost c
        for option in range(costs.shape[1]):
            w = weights[layer, option]
            if 0 <= w <= capacity and np.isfinite(scores[layer, option]):
                np.add(best[: capacity + 1 - w], scores[layer, option], out=candidates[option, w:])
        choice[layer] = np.argmin(candidates, axis=0)
        best = candidates.min(axis=0)
    at = int(np.argmin(best))
    picks = np.zeros(n_layers, dtype=np.int64)
    for layer in range(n_layers - 1, -1, -1):
        picks[layer] = choice[layer, at]
        at -= weights[layer, picks[layer]]
    return spend_slack(params, costs, scores, budget_bits, picks)


def spend_slack(params: np.ndarray, costs: np.ndarray, scores: np.ndarray, budget_bits: float,
                picks: np.ndarray) -> np.ndarray:
    """Return `picks` upgraded greedily while an upgrade fits the budget and does not raise its layer's score.

    Upgrades go best score reduction per extra bit first. Afterwards no single layer can move to a
    costlier option of no higher score within the budget left (the allocation is maximal).
    """
    picks = picks.copy()
    rows = np.arange(len(picks))
    while True:
        used = float((params * costs[rows, picks]).sum())
        extra = params[:, None] * (costs - costs[rows, picks][:, None])
        gain = scores[rows, picks][:, None] - scores
        fits = (extra > 0) & (gain >= 0) & (used + extra <= budget_bits) & np.isfinite(scores)
        if not fits.any():
            return picks
        value = np.where(fits, gain / np.where(extra > 0, extra, 1.0), -np.inf)
        layer, option = np.unravel_index(int(np.argmax(value)), value.shape)
        picks[layer] = option


def monotone_within_grid(scores: np.ndarray, specs: list[QuantSpec]) -> np.ndarray:
    """Return `scores` with each option's score capped by those of narrower widths of the same grid."""
    out = scores.copy()
    for grid in {s.grid for s in specs}:
        order = sorted((s.bits, i) for i, s in enumerate(specs) if s.grid == grid)
        for (_, narrower), (_, wider) in zip(order, order[1:]):
            out[:, wider] = np.minimum(out[:, wider], out[:, narrower])
    return out


class AllocateBits(Pass):
    """Assign a QuantSpec per selected layer for a target average (bits per weight) or a byte budget.

    A bit target always counts log2(levels). A byte budget counts what storage will cost: each
    option's measured code entropy (cost_model='entropy', for rANS storage) or log2(levels)
    (cost_model='log2', for fixed-rate storage).
    """

    requires = ("selection", "sensitivity")
    provides = ("bits",)

    def __init__(self, target_bits: float | None = None, budget_bytes: int | None = None,
                 options: tuple[str, ...] | None = None, eta: float = 0.0, mode: str = "local",
                 scale_init: str = "als", cost_model: str = "entropy"):
        if (target_bits is None) == (budget_bytes is None):
            raise ValueError("give exactly one of target_bits and budget_bytes")
        self.target_bits, self.budget_bytes = target_bits, budget_bytes
        self.options, self.eta, self.mode = options, eta, mode
        self.scale_init, self.cost_model = scale_init, cost_model

    def run(self, graph: Graph) -> PassResult:
        paths = selected_layers(graph)
        if not paths:
            raise AllocationError("no layer is selected for quantization")
        sens = [graph.annotation(p).sensitivity.get(self.mode) for p in paths]
        missing = [p for p, s in zip(paths, sens) if s is None]
        if missing:
            raise AllocationError(f"no {self.mode!r} sensitivity for {missing[:3]}")
        keys = list(self.options or sens[0].error)
        specs = [QuantSpec.from_key(k, scale_init=self.scale_init) for k in keys]
        params = np.array([graph.layers[p].weight_params for p in paths], dtype=np.float64)
        costs = np.tile([s.cost_bits for s in specs], (len(paths), 1))
        entropies = [graph.annotation(p).code_entropy for p in paths]
        stored = (self.budget_bytes is not None and self.cost_model == "entropy"
                  and all(all(k in e for k in keys) for e in entropies))
        if stored:  # rANS stores codes at their entropy, plus the symbol-count table of each stream
            table = np.array([s.levels * 64 for s in specs])[None, :] / params[:, None]
            budget_costs = np.array([[e[k] * 1.001 for k in keys] for e in entropies]) + table
        elif self.budget_bytes is not None:  # fixed-rate radix words: slightly above log2(levels)
            rates = [radix_plan(s.levels)[1] / radix_plan(s.levels)[0] for s in specs]
            budget_costs = np.tile(rates, (len(paths), 1))
        else:
            budget_costs = costs
        scores = np.array([[s.error.get(k, np.inf) for k in keys] for s in sens]) / params[:, None] ** self.eta
        scores = monotone_within_grid(scores, specs)
        total = params.sum()
        if self.budget_bytes is not None:
            spare = self.budget_bytes - fixed_bytes(graph, paths)
            target = spare * 8 / total
        else:
            target = self.target_bits
        lowest = float((params * budget_costs.min(axis=1)).sum() / total)
        if target < lowest - 1e-12:
            asked = (f"a budget of {self.budget_bytes:,} bytes leaves {target:.4f} bits per weight"
                     if self.budget_bytes is not None else f"a target of {target:.4f} bits per weight")
            raise AllocationError(f"{asked} for the {len(paths)} selected layers; the lowest possible with "
                                  f"options {keys} is {lowest:.4f}")
        picks = solve_allocation(params, budget_costs, scores, target * total)
        achieved = float((params * budget_costs[np.arange(len(paths)), picks]).sum() / total)
        if achieved > target + 1e-9:
            raise AllocationError(f"internal: allocation of {achieved:.6f} bits per weight exceeds the target "
                                  f"{target:.6f}")
        for path, pick in zip(paths, picks):
            graph.annotation(path).quant = specs[pick]
        counts = {k: int((picks == i).sum()) for i, k in enumerate(keys)}
        log2_bits = float((params * costs[np.arange(len(paths)), picks]).sum() / total)
        cost_model = "stored entropy" if stored else ("radix words" if self.budget_bytes else "log2(levels)")
        return PassResult(graph, False, {
            "target_bits": round(float(target), 4), "achieved_bits": round(achieved, 4),
            "unspent_bits": round(float(target) - achieved, 4),
            "cost_model": cost_model, "log2_levels_bits": round(log2_bits, 4),
            "layers_per_option": counts, "eta": self.eta, "mode": self.mode,
            "quantized_weights": int(total)})


def weights_only_bits(graph: Graph) -> float:
    """Return the parameter-weighted average log2(levels) over quantized layers."""
    pairs = [(graph.layers[p].weight_params, a.quant.cost_bits) for p, a in graph.annotations().items() if a.quant]
    n = sum(w for w, _ in pairs)
    return sum(w * b for w, b in pairs) / n if n else math.nan


__all__ = ["AllocateBits", "fixed_bytes", "monotone_within_grid", "solve_allocation", "spend_slack",
           "weights_only_bits"]
