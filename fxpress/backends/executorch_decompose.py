"""Rewrite the ops XNNPACK has no kernel for into ones it has, before an ExecuTorch export partitions.

Group norm, layer norm and nearest upsampling are not XNNPACK operators, so each one ends a delegate
and starts another: a diffusion UNet splits into dozens of delegates per network call, and every split
costs file bytes (the boundary tensors, another delegate header) and a trip through the portable
runtime. Written as reshapes, means over the two innermost axes, rsqrt, element-wise arithmetic and
concatenation, all of them stay inside XNNPACK. The results equal the portable kernels' to float
rounding (about 1e-6).
"""

from __future__ import annotations

import math

import torch

aten = torch.ops.aten


def _group_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, n: int, c: int,
                hw: int, groups: int, eps: float):
    """aten.native_group_norm as a 4-D (N, G, C/G, HW) mean and variance over the two inner axes."""
    grouped = x.reshape(n, groups, c // groups, hw)
    mean = grouped.mean(dim=(2, 3), keepdim=True)
    centred = grouped - mean
    rstd = torch.rsqrt((centred * centred).mean(dim=(2, 3), keepdim=True) + eps)
    out = (centred * rstd).reshape(x.shape)
    affine = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        out = out * weight.reshape(affine)
    if bias is not None:
        out = out + bias.reshape(affine)
    return out, mean.reshape(n, groups), rstd.reshape(n, groups)


def _layer_norm(x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float):
    """aten.native_layer_norm as a 4-D (1, rows, features, 1) mean and variance over the inner axes."""
    axis = x.dim() - len(normalized_shape)
    rows, features = math.prod(x.shape[:axis]), math.prod(normalized_shape)
    flat = x.reshape(1, rows, features, 1)
    mean = flat.mean(dim=(2, 3), keepdim=True)
    centred = flat - mean
    rstd = torch.rsqrt((centred * centred).mean(dim=(2, 3), keepdim=True) + eps)
    out = (centred * rstd).reshape(x.shape)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    stats = tuple(x.shape[:axis]) + (1,) * len(normalized_shape)
    return out, mean.reshape(stats), rstd.reshape(stats)


def _repeat_each(x: torch.Tensor, dim: int, times: int) -> torch.Tensor:
    return x if times == 1 else torch.cat([x] * times, dim=dim)


def _nearest_2d(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Nearest upsampling by whole factors: (N, C, H, 1, W, 1) concatenated along the unit axes."""
    n, c, h, w = x.shape
    wide = x.reshape(n, c, h, 1, w, 1)
    wide = _repeat_each(_repeat_each(wide, 5, out_w // w), 3, out_h // h)
    return wide.reshape(n, c, out_h, out_w)


def _nearest_vec(x: torch.Tensor, output_size, scale_factors):
    if output_size is None:
        output_size = [int(math.floor(s * f)) for s, f in zip(x.shape[2:], scale_factors)]
    return _nearest_2d(x, *output_size)


def _nearest(x: torch.Tensor, output_size, scales_h=None, scales_w=None):
    return _nearest_2d(x, *output_size)


def _whole_factor(node: torch.fx.Node) -> bool:
    """Whether an upsample node's output is its input repeated a whole number of times per axis."""
    source, out = node.args[0].meta.get("val"), node.meta.get("val")
    if source is None or out is None or source.dim() != 4:
        return False
    return all(isinstance(a, int) and isinstance(b, int) and b >= a and b % a == 0
               for a, b in zip(source.shape[2:], out.shape[2:]))


UPSAMPLE = (aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default)


def xnnpack_decompositions() -> dict:
    """The decomposition table (op → function) for `ExportedProgram.run_decompositions`."""
    return {
        aten.native_group_norm.default: _group_norm,
        aten.native_layer_norm.default: _layer_norm,
        aten.upsample_nearest2d.vec: _nearest_vec,
        aten.upsample_nearest2d.default: _nearest,
    }


def decompose_for_xnnpack(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Return `program` with group norm, layer norm and whole-factor nearest upsampling rewritten into
    operators XNNPACK runs (see the module docstring)."""
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    present = {n.target for n in nodes}
    if not all(_whole_factor(n) for n in nodes if n.target in UPSAMPLE):
        present -= set(UPSAMPLE)  # a fractional factor stays one portable upsample op
    table = {op: fn for op, fn in xnnpack_decompositions().items() if op in present}
    return program.run_decompositions(table) if table else program
