"""`FuseLoRA` / `UnfuseLoRA`: fold LoRA branches into their base weights, and take them out again.

Float bases: W ← W + scale·(alpha/r)·B·A computed in float64 and rounded once to the weight's dtype;
the wrapper keeps its factors (marked fused, not run) so `UnfuseLoRA` subtracts the same change.
Low-bit bases: the dequantized weight plus the change is quantized again on the layer's own grid (same
levels), with per-channel scales refitted (the better of the old scale and a fresh fit, per row); the
factors are dropped, since codes cannot be unfused exactly. The report gives each low-bit layer's fuse
error (relative Frobenius error against the float merge) beside the error its original quantization
made, when the artifact recorded it, and how much of the branch's change the new codes carry
(`change_kept`: the realised change projected on the intended one, 1.0 = all of it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxpress.errors import RecipeError
from fxpress.ir.annotations import QuantSpec
from fxpress.ir.graph import Graph
from fxpress.kernels.lora import LoRA
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.module_edit import replace_submodule
from fxpress.passes.quant.scale_init import fit_scales, quantize_rows
from fxpress.passes.rewire.branches import recaptured, registry, resolve_names

LOWBIT = (LowBitLinear, LowBitConv2d)


def grid_of(layer: LowBitLinear | LowBitConv2d, scale_dtype: str = "float16") -> QuantSpec:
    """The QuantSpec whose grid a low-bit layer's codes live on (levels and offset decide it)."""
    for bits in range(1, 9):
        for grid in ("balanced", "plain"):
            spec = QuantSpec(bits, grid, scale_dtype=scale_dtype)
            if spec.levels == layer.levels and spec.qmin == -layer.offset:
                return spec
    raise RecipeError(f"a low-bit layer with {layer.levels} levels from {-layer.offset} is on no fxpress grid")


def requantized(layer: LowBitLinear | LowBitConv2d, merged: torch.Tensor) -> tuple[nn.Module, float]:
    """Return (a low-bit layer holding `merged` on `layer`'s grid, relative error against `merged`).

    Below about 3 bits a change much smaller than the grid step mostly rounds back to the old codes:
    `change_kept` in FuseLoRA's report says how much of it the new codes carry."""
    spec = grid_of(layer, str(layer.scale.dtype).removeprefix("torch."))
    w2d = merged.reshape(merged.shape[0], -1).float()
    candidates = []
    for scale in (layer.scale, fit_scales(w2d, spec)):
        codes = quantize_rows(w2d, scale, spec)
        err = ((codes.float() * scale.float().unsqueeze(1) - w2d) ** 2).sum(dim=1)
        candidates.append((codes, scale.to(layer.scale.dtype), err))
    take_fit = candidates[1][2] < candidates[0][2]
    codes = torch.where(take_fit.unsqueeze(1), candidates[1][0], candidates[0][0])
    scale = torch.where(take_fit, candidates[1][1], candidates[0][1])
    deq = codes.double() * scale.double().unsqueeze(1)
    error = float((deq - merged.reshape(deq.shape)).norm() / merged.norm().clamp_min(1e-30))
    codes = codes.reshape(layer.weight_shape)
    bias = layer.bias
    if isinstance(layer, LowBitLinear):
        new = LowBitLinear(codes, scale, bias, spec.qmin, spec.levels)
    else:
        new = LowBitConv2d(codes, scale, bias, spec.qmin, spec.levels, layer.stride, layer.padding, layer.dilation,
                           layer.groups)
    new.kernels, new.fallback = layer.kernels, layer.fallback
    return new, error


@torch.no_grad()
def fuse_float(wrapper: LoRA) -> None:
    """Fold the branch into a float base weight in place (float64 sum, one rounding); mark it fused."""
    weight = wrapper.base_layer.weight
    weight.copy_((weight.double() + wrapper.delta_weight()).to(weight.dtype))
    wrapper.fused = True


@torch.no_grad()
def unfuse_float(wrapper: LoRA) -> None:
    """Take a fused branch's change out of its float base weight again; mark it unfused."""
    weight = wrapper.base_layer.weight
    weight.copy_((weight.double() - wrapper.delta_weight()).to(weight.dtype))
    wrapper.fused = False


class _LoRAState(Pass):
    """A pass over LoRA branches in one fused state: `names`, or by default every LoRA branch in it."""

    transforms = True
    wants_fused: bool

    def __init__(self, names: list[str] | tuple[str, ...] | None = None):
        self.names = None if names is None else list(names)

    def chosen(self, graph: Graph) -> list[str]:
        """The branches to act on; RecipeError for an unknown one, one of another kind or in the other state."""
        entries = registry(graph)
        if self.names is None:
            return [n for n, e in entries.items() if e["kind"] == "lora" and bool(e.get("fused")) == self.wants_fused]
        for name in resolve_names(graph, self.names, self.name):
            if entries[name]["kind"] != "lora":
                raise RecipeError(f"{self.name}: branch {name!r} is a {entries[name]['kind']} branch, not LoRA")
            if bool(entries[name].get("fused")) != self.wants_fused:
                raise RecipeError(f"{self.name}: branch {name!r} is {'not ' if self.wants_fused else ''}fused")
        return list(self.names)


class FuseLoRA(_LoRAState):
    """Fold the LoRA branches `names` (default: every unfused LoRA branch) into their base weights."""

    provides = ("fused",)
    wants_fused = False

    def run(self, graph: Graph) -> PassResult:
        entries = registry(graph)
        names = self.chosen(graph)
        model, renamed = graph.module, {}
        layers: dict[str, dict[str, Any]] = {}
        with torch.no_grad():
            for name in names:
                entry = entries[name]
                kept = []
                for path in entry["targets"]:
                    wrapper = model.get_submodule(path)
                    base = wrapper.base_layer
                    if isinstance(base, LOWBIT):
                        old, change = base.weight.double(), wrapper.delta_weight()
                        new, error = requantized(base, old + change)
                        realized = new.weight.double() - old
                        carried = float((realized * change).sum() / (change * change).sum().clamp_min(1e-300))
                        replace_submodule(model, path, new)
                        renamed[f"{path}.base_layer"] = path
                        base_path = f"{path}.base_layer"
                        quant_error = graph.annotation(base_path).weight_error if base_path in graph.layers else None
                        layers[path] = {"branch": name, "base": "low-bit", "levels": base.levels,
                                        "fuse_error": error, "quantization_error": quant_error,
                                        "change_kept": carried}
                    else:
                        fuse_float(wrapper)
                        kept.append(path)
                        layers[path] = {"branch": name, "base": "float"}
                entry["merged"] = sorted(set(entry.get("merged", [])) | (set(entry["targets"]) - set(kept)))
                entry["targets"], entry["fused"] = kept, True
        new = recaptured(graph, model, renamed)
        return PassResult(new, bool(names), {"fused": names, "layers": layers})


class UnfuseLoRA(_LoRAState):
    """Take fused LoRA branches (float bases) out of the weights again; they run as branches once more."""

    provides = ("unfused",)
    wants_fused = True

    def run(self, graph: Graph) -> PassResult:
        entries = registry(graph)
        names = self.chosen(graph)
        for name in names:
            entry = entries[name]
            if entry.get("merged"):
                raise RecipeError(f"UnfuseLoRA: branch {name!r} was requantized into low-bit layers "
                                  f"{entry['merged'][:3]}; their codes cannot be unfused")
            for path in entry["targets"]:
                unfuse_float(graph.module.get_submodule(path))
            entry["fused"] = False
        new = recaptured(graph, graph.module, {})
        return PassResult(new, bool(names), {"unfused": names})


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return `model`'s weights with every float LoRA branch folded in, under the names the layers had before
    `InsertLoRA` wrapped them (so the state loads into the unwrapped model class)."""
    state = dict(model.state_dict())
    for path, module in model.named_modules():
        if not isinstance(module, LoRA):
            continue
        prefix = f"{path}." if path else ""
        inner = prefix + "base_layer."
        for key in [k for k in state if k.startswith(prefix)]:  # the branch's factors and scale go
            value = state.pop(key)
            if key.startswith(inner):
                state[prefix + key[len(inner):]] = value
        if not module.fused:
            weight = getattr(module.base_layer, "weight", None)
            if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
                raise RecipeError(f"LoRA at {path!r} wraps a {type(module.base_layer).__name__}, not a float layer: "
                                  "use FuseLoRA, which requantizes low-bit layers")
            state[prefix + "weight"] = (weight.double() + module.delta_weight()).to(weight.dtype)
    return state
