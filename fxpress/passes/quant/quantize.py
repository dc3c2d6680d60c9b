"""`QuantizeWeights`: replace each layer that has a QuantSpec by a LowBitLinear/LowBitConv2d."""

from __future__ import annotations

import torch
from torch import nn

from fxpress.errors import PassError
from fxpress.ir.graph import Graph
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear, conv_geometry
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.module_edit import replace_submodule
from fxpress.passes.progress import progress_bar
from fxpress.passes.quant.scale_cache import forget_scales, recall_scale
from fxpress.passes.quant.scale_init import fit_scales, quantize_rows


def lowbit_module(module: nn.Module, codes: torch.Tensor, scale: torch.Tensor, qmin: int, levels: int) -> nn.Module:
    """Return the low-bit replacement of a Linear or zero-padded Conv2d holding `codes` and `scale`."""
    bias = None if module.bias is None else module.bias.detach()
    if isinstance(module, nn.Linear):
        return LowBitLinear(codes, scale, bias, qmin, levels)
    if isinstance(module, nn.Conv2d):
        return LowBitConv2d(codes.reshape(module.weight.shape), scale, bias, qmin, levels, **conv_geometry(module))
    raise TypeError(f"cannot quantize {type(module).__name__}")


class QuantizeWeights(Pass):
    """Quantize every annotated layer per output channel and swap in its low-bit module."""

    requires = ("bits",)
    provides = ("quantized",)
    transforms = True

    @torch.no_grad()
    def run(self, graph: Graph) -> PassResult:
        todo = [(p, a.quant) for p, a in graph.annotations().items() if a.quant is not None]
        errors = {}
        with progress_bar("quantizing", len(todo)) as advance:
            for path, spec in todo:
                module = graph.module.get_submodule(path)
                if not isinstance(module, (nn.Linear, nn.Conv2d)):
                    raise PassError(f"layer is a {type(module).__name__}, not Linear/Conv2d", self.name,
                                    node=graph.layers[path].nodes[0], module_path=path)
                w2d = module.weight.detach().reshape(module.weight.shape[0], -1).float()
                scale = recall_scale(graph, path, spec)
                if scale is None:
                    scale = fit_scales(w2d, spec)
                codes = quantize_rows(w2d, scale, spec)
                deq = codes.float() * scale.float().unsqueeze(1)
                err = float((deq - w2d).norm() / w2d.norm().clamp_min(1e-30))
                graph.annotation(path).weight_error = err
                errors[path] = err
                replace_submodule(graph.module, path, lowbit_module(module, codes, scale, spec.qmin, spec.levels))
                advance()
        forget_scales(graph)
        worst = max(errors, key=errors.get) if errors else None
        return PassResult(graph, bool(todo), {"quantized": len(todo),
                                              "worst_weight_error": [worst, errors.get(worst)]})


class RoundToStorage(Pass):
    """Round every floating tensor left in full precision to `dtype` values (kept in its own dtype), so
    the saved artifact (which stores them in `dtype`) equals the in-memory model exactly. Tables of
    cached time embeddings keep their precision."""

    transforms = True
    provides = ("rounded",)

    def __init__(self, dtype: str = "float16"):
        self.dtype = getattr(torch, dtype)

    @torch.no_grad()
    def run(self, graph: Graph) -> PassResult:
        changed = 0
        exempt = {f"{path}.table" for path in graph.extras.get("time_cache", {}).get("modules", [])}
        for name, tensor in [*graph.module.named_parameters(), *graph.module.named_buffers()]:
            if tensor.is_floating_point() and name not in exempt and tensor.dtype != self.dtype:
                rounded = tensor.to(self.dtype).to(tensor.dtype)
                if not torch.equal(rounded, tensor):
                    tensor.copy_(rounded)
                    changed += 1
        return PassResult(graph, changed > 0, {"tensors_rounded": changed, "dtype": str(self.dtype)})
