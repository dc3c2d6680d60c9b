"""`AllocateBits`: choose a grid per layer that minimises total sensitivity under a bit or byte budget.

Cost of an option is log2(levels) bits per weight (a balanced 2-bit layer costs 2.32). The choice is
an exact multiple-choice knapsack solved by dynamic programming over a cost grid; costs are rounded
up on that grid, so the true average never exceeds the target. Each layer's score is its
sensitivity divided by params**eta (BitsFusion's parameter-size factor).
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
                     resolution: float = 0.001) -> np.ndarray:
    """Return the option index per layer minimising sum(scores) with sum(params*costs) <= budget_bits.

    `costs` and `scores` are (layers, options). `resolution` bounds the bits-per-weight given up to
    rounding. Raises AllocationError when even the cheapest choice is over budget.
    """
    n_layers, _ = costs.shape
    total = float(params.sum())
    unit = resolution * total / n_layers
    weights = np.ceil(params[:, None] * costs / unit - 1e-9).astype(np.int64)
    capacity = int(math.floor(budget_bits / unit + 1e-9))
    if weights.min(axis=1).sum() > capacity:
        raise AllocationError(f"the budget of {budget_bits / total:.4f} bits per weight is below the "
                              f"cheapest option ({(params * costs.min(axis=1)).sum() / total:.4f})")
    best = np.zeros(capacity + 1)
    choice = np.zeros((n_layers, capacity + 1), dtype=np.int16)
    for layer in range(n_layers):
        new = np.full(capacity + 1, np.inf)
        for option in range(costs.shape[1]):
            w = weights[layer, option]
            if w > capacity or not np.isfinite(scores[layer, option]):
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[w:] = best[: capacity + 1 - w] + scores[layer, option]
            take = candidate < new
            new[take] = candidate[take]
            choice[layer, take] = option
        best = new
    at = int(np.argmin(best))
    picks = np.zeros(n_layers, dtype=np.int64)
    for layer in range(n_layers - 1, -1, -1):
        picks[layer] = choice[layer, at]
        at -= weights[layer, picks[layer]]
    return picks


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
                 scale_init: str = "als", tolerance: float = 0.01, cost_model: str = "entropy"):
        if (target_bits is None) == (budget_bytes is None):
            raise ValueError("give exactly one of target_bits and budget_bytes")
        self.target_bits, self.budget_bytes = target_bits, budget_bytes
        self.options, self.eta, self.mode = options, eta, mode
        self.scale_init, self.tolerance, self.cost_model = scale_init, tolerance, cost_model

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
        total = params.sum()
        if self.budget_bytes is not None:
            spare = self.budget_bytes - fixed_bytes(graph, paths)
            target = spare * 8 / total
        else:
            target = self.target_bits
        picks = solve_allocation(params, budget_costs, scores, target * total)
        achieved = float((params * budget_costs[np.arange(len(paths)), picks]).sum() / total)
        if achieved > target + 1e-9 or achieved < target - self.tolerance:
            best_possible = float((params * budget_costs.max(axis=1)).sum() / total)
            raise AllocationError(f"achieved {achieved:.4f} bits per weight for a target of {target:.4f} "
                                  f"(the widest options give {best_possible:.4f}); widen the options or "
                                  "lower the target")
        for path, pick in zip(paths, picks):
            graph.annotation(path).quant = specs[pick]
        counts = {k: int((picks == i).sum()) for i, k in enumerate(keys)}
        log2_bits = float((params * costs[np.arange(len(paths)), picks]).sum() / total)
        cost_model = "stored entropy" if stored else ("radix words" if self.budget_bytes else "log2(levels)")
        return PassResult(graph, False, {
            "target_bits": round(float(target), 4), "achieved_bits": round(achieved, 4),
            "cost_model": cost_model, "log2_levels_bits": round(log2_bits, 4),
            "layers_per_option": counts, "eta": self.eta, "mode": self.mode,
            "quantized_weights": int(total)})


def weights_only_bits(graph: Graph) -> float:
    """Return the parameter-weighted average log2(levels) over quantized layers."""
    pairs = [(graph.layers[p].weight_params, a.quant.cost_bits) for p, a in graph.annotations().items() if a.quant]
    n = sum(w for w, _ in pairs)
    return sum(w * b for w, b in pairs) / n if n else math.nan


__all__ = ["AllocateBits", "fixed_bytes", "solve_allocation", "weights_only_bits"]
