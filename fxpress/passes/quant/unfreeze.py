"""Turn packed low-bit layers back into fake-quant layers, so a saved low-bit model can be trained again.

The fake-quant twin starts at exactly the stored weight (codes times scale) and scale, so freezing it
again without training gives the same codes and scales: a 1.99-bit artifact can be step-distilled and
written back at 1.99 bits.
"""

from __future__ import annotations

import torch
from torch import nn

from fxpress.errors import ArtifactError
from fxpress.ir.annotations import QuantSpec
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear
from fxpress.passes.module_edit import replace_submodule
from fxpress.passes.quant.fake_quant import fake_quant_module


def spec_of(module: LowBitLinear | LowBitConv2d) -> QuantSpec:
    """Return the grid a low-bit layer's levels and offset describe (balanced: 2^b + 1 levels; plain: 2^b)."""
    levels, qmin = module.levels, -module.offset
    for bits in range(1, 9):
        for grid, count in (("balanced", 2 ** bits + 1), ("plain", 2 ** bits)):
            if levels == count and qmin == -(2 ** (bits - 1)):
                return QuantSpec(bits, grid)
    raise ArtifactError(f"a layer with {levels} levels from {qmin} is on no grid fxpress trains")


@torch.no_grad()
def fake_quant_from_lowbit(module: LowBitLinear | LowBitConv2d) -> nn.Module:
    """Return the fake-quant twin of a packed layer, at its stored weight and scale."""
    spec = spec_of(module)
    dense = module._empty_dense()
    scale = module.scale.float()
    weight = module.codes().float() * scale.view(-1, *[1] * (module.codes().dim() - 1))
    dense.weight.copy_(weight.reshape(dense.weight.shape))
    if module.bias is not None:
        dense.bias.copy_(module.bias.float())
    return fake_quant_module(dense, spec, scale)


def unfreeze(model: nn.Module) -> dict[str, nn.Module]:
    """Replace every packed low-bit layer of `model` by its fake-quant twin, in place; return them by path."""
    packed = [(p, m) for p, m in model.named_modules() if isinstance(m, (LowBitLinear, LowBitConv2d))]
    fake = {}
    for path, module in packed:
        fake[path] = fake_quant_from_lowbit(module)
        replace_submodule(model, path, fake[path])
    return fake
