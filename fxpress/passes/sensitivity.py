"""`MeasureSensitivity`: the error that quantizing one layer alone causes, per candidate grid.

* local: the layer's own relative output error ||x (Wq - W)||^2 / ||x W + b||^2, on input rows
  (tokens, or im2col patches of convolutions) sampled once from the calibration forwards (fast).
* hybrid: the local error curve of each layer, scaled so that it matches one end-to-end measurement
  of that layer (at the middle option): local shape, end-to-end importance, one forward per layer.
* e2e: the model's output MSE and PSNR with only that layer quantized, over calibration inputs
  spread across timesteps (one forward per layer, option and input: exact, slower).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxpress.errors import PassError
from fxpress.ir.annotations import QuantSpec, Sensitivity
from fxpress.ir.graph import Graph, output_tensors
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.progress import progress_bar
from fxpress.passes.quant.scale_cache import remember_scale
from fxpress.passes.quant.scale_init import SortedRows, fit_scales, level_counts
from fxpress.passes.quant.select_layers import selected_layers

MODES = ("local", "hybrid", "e2e")
DEFAULT_OPTIONS = ("b1", "b2", "p2", "b3", "p3", "b4", "p4", "p8")


def _weight_delta(weight: torch.Tensor, spec: QuantSpec, scale: torch.Tensor) -> torch.Tensor:
    """Return dequant(quant(W)) - W, computed in place on a float32 copy (as quantize_rows rounds)."""
    w2d = weight.detach().reshape(weight.shape[0], -1).float()
    s = scale.float().unsqueeze(1)
    delta = torch.div(w2d, s).round_().clamp_(spec.qmin, spec.qmax).mul_(s).sub_(w2d)
    return delta.reshape(weight.shape)


def code_entropy(rows: SortedRows, spec: QuantSpec, scale: torch.Tensor) -> float:
    """Return the empirical entropy (bits per weight) of the layer's codes: what rANS storage costs."""
    counts = level_counts(rows, scale.float(), spec).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def layer_rows(module: nn.Module, x: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Return `count` rows of the layer's input matrix: token rows of a linear layer, or im2col patches
    of a (groups=1) convolution at random output positions, so that row @ W2d.T is an output value."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > count:
        rows = rows[torch.randperm(rows.shape[0], generator=generator)[:count]]
    return rows.float()


class MeasureSensitivity(Pass):
    """Annotate every selected layer with its sensitivity per option key (e.g. 'b2', 'p4')."""

    requires = ("selection",)
    provides = ("sensitivity",)

    def __init__(self, mode: str = "local", options: tuple[str, ...] = DEFAULT_OPTIONS,
                 calibration: int | None = None, scale_init: str = "als", rows_per_layer: int = 256):
        if mode not in MODES:
            raise ValueError(f"sensitivity mode must be one of {MODES}, got {mode!r}")
        self.mode, self.calibration, self.rows_per_layer = mode, calibration, rows_per_layer
        self.specs = [QuantSpec.from_key(k, scale_init=scale_init) for k in options]

    def _scales(self, graph: Graph, paths: list[str]) -> dict[tuple[str, str], torch.Tensor]:
        scales = {}
        with progress_bar("fitting scales", len(paths)) as advance:
            for path in paths:
                w = graph.module.get_submodule(path).weight.detach()
                w2d = w.reshape(w.shape[0], -1)
                rows = SortedRows.of(w2d)
                entropies = graph.annotation(path).code_entropy
                for spec in self.specs:
                    scale = fit_scales(w2d, spec, rows)
                    scales[path, spec.key] = scale
                    remember_scale(graph, path, spec, scale)
                    entropies[spec.key] = code_entropy(rows, spec, scale)
                advance()
        return scales

    def run(self, graph: Graph) -> PassResult:
        paths = selected_layers(graph)
        inputs = graph.calibration[: self.calibration] if self.calibration else graph.calibration
        clock = [time.perf_counter()]

        def lap() -> float:
            clock.append(time.perf_counter())
            return round(clock[-1] - clock[-2], 1)

        rows = self._capture_rows(graph, paths, inputs) if self.mode != "e2e" else {}
        seconds = {"capture": lap()}
        scales = self._scales(graph, paths)
        seconds["fit_scales"] = lap()
        if self.mode == "local":
            errors, psnr = self._local(graph, paths, rows, scales), {}
        elif self.mode == "hybrid":
            errors, psnr = self._hybrid(graph, paths, inputs, rows, scales)
        else:
            errors, psnr = self._e2e(graph, paths, inputs, scales)
        seconds["measure"] = lap()
        for path in paths:
            graph.annotation(path).sensitivity[self.mode] = Sensitivity(
                self.mode, errors[path], psnr.get(path, {}))
        return PassResult(graph, False, {"mode": self.mode, "layers": len(paths), "inputs": len(inputs),
                                         "options": [s.key for s in self.specs],
                                         "seconds": seconds})

    @torch.no_grad()
    def _capture_rows(self, graph, paths, inputs) -> dict[str, torch.Tensor]:
        """Run the calibration inputs once and keep `rows_per_layer` input rows of every layer."""
        generator = torch.Generator().manual_seed(0)
        per_input = max(1, self.rows_per_layer // len(inputs))
        rows: dict[str, list[torch.Tensor]] = {p: [] for p in paths}

        def make_hook(path: str):
            def hook(module: nn.Module, args: tuple) -> None:
                if isinstance(module, nn.Conv2d) and module.groups != 1:
                    raise PassError("local sensitivity needs groups=1 convolutions; use mode='e2e'",
                                    self.name, module_path=path)
                rows[path].append(layer_rows(module, args[0], per_input, generator))
            return hook

        handles = [graph.module.get_submodule(p).register_forward_pre_hook(make_hook(p)) for p in paths]
        try:
            with progress_bar("capturing calibration activations", len(inputs)) as advance:
                for inp in inputs:
                    graph.module(*inp.args, **inp.kwargs)
                    advance()
        finally:
            for h in handles:
                h.remove()
        return {p: torch.cat(r) for p, r in rows.items() if r}

    @torch.no_grad()
    def _local(self, graph, paths, rows, scales) -> dict[str, dict[str, float]]:
        errors: dict[str, dict[str, float]] = {}
        with progress_bar("local sensitivity", len(paths)) as advance:
            for path in paths:
                module = graph.module.get_submodule(path)
                x = rows.get(path)
                if x is None:
                    raise PassError("layer never ran on the calibration inputs", self.name, module_path=path)
                w2d = module.weight.detach().reshape(module.weight.shape[0], -1).float()
                out = x @ w2d.T
                if module.bias is not None:
                    out += module.bias.float()
                energy = float(out.pow(2).sum()) or 1e-30
                errors[path] = {}
                for spec in self.specs:
                    delta = _weight_delta(w2d, spec, scales[path, spec.key])
                    errors[path][spec.key] = float((x @ delta.T).pow(2).sum()) / energy
                advance()
        return errors

    def _hybrid(self, graph, paths, inputs, rows, scales):
        """Local error curves, each scaled by one end-to-end probe of its layer (at the middle option)."""
        local = self._local(graph, paths, rows, scales)
        probe = sorted(self.specs, key=lambda s: s.cost_bits)[len(self.specs) // 2]
        e2e, psnr = self._e2e(graph, paths, inputs, scales, [probe])
        errors = {}
        for path in paths:
            gain = e2e[path][probe.key] / max(local[path][probe.key], 1e-30)
            errors[path] = {k: v * gain for k, v in local[path].items()}
        return errors, psnr

    @torch.no_grad()
    def _e2e(self, graph, paths, inputs, scales, specs=None):
        refs = [output_tensors(graph.module(*i.args, **i.kwargs)) for i in inputs]
        peak = max(float(t.max() - t.min()) for ref in refs for t in ref)
        errors: dict[str, dict[str, float]] = {}
        psnr: dict[str, dict[str, float]] = {}
        specs = specs or self.specs
        with progress_bar("e2e sensitivity", len(paths) * len(specs)) as advance:
            for path in paths:
                module = graph.module.get_submodule(path)
                original = module.weight.data
                errors[path], psnr[path] = {}, {}
                for spec in specs:
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
