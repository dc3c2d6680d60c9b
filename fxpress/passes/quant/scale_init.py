"""Per-output-channel scale initialisation: min-max, and BitsFusion's alternating least squares.

ALS alternates q = clip(round(w / s)) and s = <w, q> / <q, q> until the L2 error stops falling.
Both steps are optimal given the other, so the error never rises and ALS never loses to min-max,
its starting point. Each step works on the sorted weights of a channel with prefix sums, so one
sort per layer serves every grid and every iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fxpress.ir.annotations import QuantSpec


def minmax_scales(weight2d: torch.Tensor, spec: QuantSpec, rows: SortedRows | None = None) -> torch.Tensor:
    """Return max|w| / half-range per row (float32); all-zero rows get scale 1."""
    half_range = (spec.qmax - spec.qmin) / 2
    if rows is not None:  # sorted rows: the extremes are the first and last values
        peak = torch.maximum(rows.values[:, 0].abs(), rows.values[:, -1].abs())
    else:
        peak = weight2d.abs().amax(dim=1).float()
    scale = peak.float() / half_range
    return torch.where(scale > 0, scale, torch.ones_like(scale))


@dataclass
class SortedRows:
    """Rows of a weight matrix sorted ascending, with float64 prefix sums of w and w^2."""

    values: torch.Tensor
    sum1: torch.Tensor
    sum2: torch.Tensor

    @staticmethod
    def of(weight2d: torch.Tensor) -> SortedRows:
        """Sort each row of `weight2d` and build its prefix sums."""
        # numpy's vectorised sort is several times faster than torch.sort on the CPU
        values = torch.from_numpy(np.sort(weight2d.detach().float().cpu().numpy(), axis=1))
        wide = values.double()
        zeros = torch.zeros(values.shape[0], 1, dtype=torch.float64)
        sum1 = torch.cat([zeros, wide.cumsum(dim=1)], dim=1)
        sum2 = torch.cat([zeros, wide.square_().cumsum(dim=1)], dim=1)
        return SortedRows(values, sum1, sum2)


def _moments(rows: SortedRows, scale: torch.Tensor, spec: QuantSpec):
    """Return (<w,q>, <q,q>, sum w^2) per row for q = clip(round(w / scale))."""
    levels = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float64)
    bounds = (levels[:-1] + 0.5).unsqueeze(0) * scale.double().unsqueeze(1)
    cut = torch.searchsorted(rows.values, bounds.to(rows.values.dtype).contiguous())
    n = rows.values.shape[1]
    edges = torch.cat([torch.zeros_like(cut[:, :1]), cut, torch.full_like(cut[:, :1], n)], dim=1)
    s1 = rows.sum1.gather(1, edges)
    count = (edges[:, 1:] - edges[:, :-1]).double()
    part1 = s1[:, 1:] - s1[:, :-1]
    wq = (part1 * levels).sum(dim=1)
    qq = (count * levels.square()).sum(dim=1)
    return wq, qq, rows.sum2[:, -1]


def level_counts(rows: SortedRows, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Return how many weights (over all rows) take each code qmin..qmax for `scale` (int64)."""
    bounds = (torch.arange(spec.qmin, spec.qmax, dtype=torch.float64) + 0.5).unsqueeze(0) * scale.double().unsqueeze(1)
    cut = torch.searchsorted(rows.values, bounds.to(rows.values.dtype).contiguous())
    n = rows.values.shape[1]
    edges = torch.cat([torch.zeros_like(cut[:, :1]), cut, torch.full_like(cut[:, :1], n)], dim=1)
    return (edges[:, 1:] - edges[:, :-1]).sum(dim=0)


def l2_error(rows: SortedRows, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Return the per-row squared L2 quantization error for `scale` (float64)."""
    wq, qq, ww = _moments(rows, scale, spec)
    s = scale.double()
    return (ww - 2 * s * wq + s * s * qq).clamp_min(0)


def als_scales(rows: SortedRows, spec: QuantSpec, start: torch.Tensor, max_iter: int = 25,
               rtol: float = 1e-4) -> torch.Tensor:
    """Return per-row scales from alternating least squares started at `start` (float32).

    Each row keeps a step only if it lowers its error; iteration stops once a step lowers the total
    error by less than `rtol` (relative).
    """
    scale = start.double().clone()
    wq, qq, ww = _moments(rows, scale, spec)
    err = (ww - 2 * scale * wq + scale * scale * qq).clamp_min(0)
    active = torch.ones_like(scale, dtype=torch.bool)
    for _ in range(max_iter):
        candidate = torch.where(active & (qq > 0) & (wq > 0), wq / qq.clamp_min(1e-30), scale)
        c_wq, c_qq, _ = _moments(rows, candidate, spec)
        c_err = (ww - 2 * candidate * c_wq + candidate * candidate * c_qq).clamp_min(0)
        better = active & (c_err < err)
        gain = float((err - c_err)[better].sum())
        active = better
        scale = torch.where(better, candidate, scale)
        previous = float(err.sum())
        err = torch.where(better, c_err, err)
        wq, qq = torch.where(better, c_wq, wq), torch.where(better, c_qq, qq)
        if not bool(active.any()) or gain <= rtol * previous:
            break
    return scale.float()


def quantize_rows(weight2d: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Return int32 codes clip(round(w / scale), qmin, qmax) per row."""
    codes = torch.round(weight2d.float() / scale.float().unsqueeze(1))
    return codes.clamp_(spec.qmin, spec.qmax).to(torch.int32)


def best_shrunk_start(rows: SortedRows, spec: QuantSpec, minmax: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """Return, per row, the best of `steps` shrunk min-max scales (0.15..1.0 of min-max).

    Clipping outliers pays at low widths; starting ALS near the optimum saves many iterations.
    """
    best, best_err = minmax, l2_error(rows, minmax, spec)
    for fraction in torch.linspace(0.15, 1.0, steps)[:-1].tolist():
        candidate = minmax * fraction
        err = l2_error(rows, candidate, spec)
        take = err < best_err
        best, best_err = torch.where(take, candidate, best), torch.where(take, err, best_err)
    return best


def fit_scales(weight2d: torch.Tensor, spec: QuantSpec, rows: SortedRows | None = None) -> torch.Tensor:
    """Return the stored-precision scales for `spec` (its scale_init and scale_dtype).

    ALS starts from the best of a few shrunk min-max scales (min-max itself included).
    With ALS, each row keeps whichever of the ALS and min-max scales has the smaller error once
    rounded to the stored dtype, so ALS is never worse than min-max on any row.
    """
    dtype = getattr(torch, spec.scale_dtype)
    start = minmax_scales(weight2d, spec, rows)
    if spec.scale_init == "minmax":
        return start.to(dtype)
    rows = rows or SortedRows.of(weight2d)
    if spec.levels > 64:  # wide grids: min-max is within about 1% of the optimum; a few steps suffice
        als = als_scales(rows, spec, start, max_iter=3).to(dtype)
    else:
        als = als_scales(rows, spec, best_shrunk_start(rows, spec, start)).to(dtype)
    mm = start.to(dtype)
    keep_als = l2_error(rows, als.float(), spec) <= l2_error(rows, mm.float(), spec)
    return torch.where(keep_als, als, mm)
