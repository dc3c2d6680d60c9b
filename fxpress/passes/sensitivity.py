"""`MeasureSensitivity`: the error that quantizing one layer alone causes, per candidate grid.

* local: the layer's own relative output error ||x (Wq - W)||^2 / ||y||^2 on calibration inputs,
  measured in one forward pass per input (fast).
* e2e: the model's output MSE and PSNR with only that layer quantized, over calibration inputs
  spread across timesteps (one forward per layer, option and input: exact, slower).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxpress.ir.annotations import QuantSpec, Sensitivity
from fxpress.ir.graph import Graph, output_tensors
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.progress import progress_bar
from fxpress.passes.quant.scale_init import SortedRows, fit_scales, quantize_rows
from fxpress.passes.quant.select_layers import selected_layers

DEFAULT_OPTIONS = ("b1", "b2", "p2", "b3", "p3", "b4", "p4", "p8")


def _weight_delta(weight: torch.Tensor, spec: QuantSpec, scale: torch.Tensor) -> torch.Tensor:
    w2d = weight.detach().reshape(weight.shape[0], -1).float()
    deq = quantize_rows(w2d, scale, spec).float() * scale.float().unsqueeze(1)
    return (deq - w2d).reshape(weight.shape)


def _apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight.to(x.dtype), None)
    return F.linear(x, weight.to(x.dtype))


def subsample(module: nn.Module, x: torch.Tensor, max_positions: int) -> torch.Tensor:
    """Return a representative slice of a layer input with at most ~`max_positions` output positions:
    evenly strided rows for a linear layer, a centred spatial crop for a convolution."""
    if isinstance(module, nn.Conv2d):
        h, w = x.shape[-2:]
        side = max(1, int(max_positions ** 0.5))
        if h * w <= max_positions or side >= min(h, w):
            return x
        stride = module.stride[0]
        halo = (module.kernel_size[0] - 1) // 2
        size = side * stride + 2 * halo
        top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
        return x[..., top:top + size, left:left + size]
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= max_positions:
        return rows
    step = rows.shape[0] / max_positions
    return rows[(torch.arange(max_positions) * step).long()]


class MeasureSensitivity(Pass):
    """Annotate every selected layer with its sensitivity per option key (e.g. 'b2', 'p4')."""

    requires = ("selection",)
    provides = ("sensitivity",)

    def __init__(self, mode: str = "local", options: tuple[str, ...] = DEFAULT_OPTIONS,
                 calibration: int | None = None, scale_init: str = "als", max_positions: int = 2048):
        if mode not in ("local", "e2e"):
            raise ValueError(f"sensitivity mode must be 'local' or 'e2e', got {mode!r}")
        self.mode, self.calibration, self.max_positions = mode, calibration, max_positions
        self.specs = [QuantSpec.from_key(k, scale_init=scale_init) for k in options]

    def _scales(self, graph: Graph, paths: list[str]) -> dict[tuple[str, str], torch.Tensor]:
        scales = {}
        with progress_bar("fitting scales", len(paths)) as advance:
            for path in paths:
                w = graph.module.get_submodule(path).weight.detach()
                w2d = w.reshape(w.shape[0], -1)
                rows = SortedRows.of(w2d)
                for spec in self.specs:
                    scales[path, spec.key] = fit_scales(w2d, spec, rows)
                advance()
        record_scales(graph, {(p, f"{k}:{self.specs[0].scale_init}"): v for (p, k), v in scales.items()})
        return scales

    def run(self, graph: Graph) -> PassResult:
        paths = selected_layers(graph)
        inputs = graph.calibration[: self.calibration] if self.calibration else graph.calibration
        scales = self._scales(graph, paths)
        if self.mode == "local":
            errors, psnr = self._local(graph, paths, inputs, scales), {}
        else:
            errors, psnr = self._e2e(graph, paths, inputs, scales)
        for path in paths:
            graph.annotation(path).sensitivity[self.mode] = Sensitivity(
                self.mode, errors[path], psnr.get(path, {}))
        return PassResult(graph, False, {"mode": self.mode, "layers": len(paths), "inputs": len(inputs),
                                         "options": [s.key for s in self.specs]})

    @torch.no_grad()
    def _local(self, graph, paths, inputs, scales) -> dict[str, dict[str, float]]:
        num: dict[str, dict[str, float]] = {p: defaultdict(float) for p in paths}
        den: dict[str, float] = defaultdict(float)

        def make_hook(path: str, advance):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                x = subsample(module, args[0], self.max_positions)
                den[path] += float(_apply(module, x, module.weight).float().pow(2).sum())
                for spec in self.specs:
                    delta = _weight_delta(module.weight, spec, scales[path, spec.key])
                    num[path][spec.key] += float(_apply(module, x, delta).float().pow(2).sum())
                advance()
            return hook

        with progress_bar("local sensitivity", len(paths) * len(inputs)) as advance:
            handles = [graph.module.get_submodule(p).register_forward_hook(make_hook(p, advance)) for p in paths]
            try:
                for inp in inputs:
                    graph.module(*inp.args, **inp.kwargs)
            finally:
                for h in handles:
                    h.remove()
        return {p: {k: v / max(den[p], 1e-30) for k, v in num[p].items()} for p in paths}

    @torch.no_grad()
    def _e2e(self, graph, paths, inputs, scales):
        refs = [output_tensors(graph.module(*i.args, **i.kwargs)) for i in inputs]
        peak = max(float(t.max() - t.min()) for ref in refs for t in ref)
        errors: dict[str, dict[str, float]] = {}
        psnr: dict[str, dict[str, float]] = {}
        with progress_bar("e2e sensitivity", len(paths) * len(self.specs)) as advance:
            for path in paths:
                module = graph.module.get_submodule(path)
                original = module.weight.data
                errors[path], psnr[path] = {}, {}
                for spec in self.specs:
                    module.weight.data = original + _weight_delta(original, spec, scales[path, spec.key])
                    try:
                        sq, count = 0.0, 0
                        for inp, ref in zip(inputs, refs):
                            out = output_tensors(graph.module(*inp.args, **inp.kwargs))
                            sq += sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(out, ref))
                            count += sum(r.numel() for r in ref)
                    finally:
                        module.weight.data = original
                    mse = sq / max(count, 1)
                    errors[path][spec.key] = mse
                    psnr[path][spec.key] = 10 * math.log10(peak**2 / mse) if mse > 0 else math.inf
                    advance()
        return errors, psnr


def record_scales(graph: Graph, scales: dict[tuple[str, str], torch.Tensor]) -> None:
    """Remember fitted scales, keyed (path, 'key:scale_init'), tagged with the weight they were fitted on."""
    store = graph.extras.setdefault("fitted_scales", {})
    for (path, key), scale in scales.items():
        weight = graph.module.get_submodule(path).weight
        store[path, key] = (weight.data_ptr(), weight._version, scale)


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def rank_correlation(graph: Graph, a: str = "local", b: str = "e2e") -> float:
    """Return Spearman's rank correlation between two sensitivity modes over all (layer, option) pairs."""
    xs, ys = [], []
    for ann in graph.annotations().values():
        if a in ann.sensitivity and b in ann.sensitivity:
            for key, value in ann.sensitivity[a].error.items():
                if key in ann.sensitivity[b].error:
                    xs.append(value)
                    ys.append(ann.sensitivity[b].error[key])
    if len(xs) < 3:
        raise ValueError(f"need sensitivities in both {a!r} and {b!r} modes")
    rx, ry = _ranks(np.array(xs)), _ranks(np.array(ys))
    return float(np.corrcoef(rx, ry)[0, 1])
