"""Lower a compressed model onto the Triton low-bit kernels with one call: `lower(artifact_or_graph)`.

Lowering moves the model to the device and sets each low-bit layer's `kernels` to "triton": that
layer then calls `fxpress::lowbit_linear_triton` / `fxpress::lowbit_conv2d_triton` (the Triton
dispatcher: fused kernel or dequantize + cuBLAS/cuDNN, tuned per shape). The choice belongs to the
lowered model's layers alone; any other model in the process keeps running what it ran. On the CPU
this needs TRITON_INTERPRET=1 (set before fxpress is imported), which is how the tests check the
kernels without a GPU.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from fxpress.backends.targets import as_module
from fxpress.errors import LoweringError, LoweringWarning
from fxpress.kernels import ops
from fxpress.kernels.kernel_config import interpreting
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear
from fxpress.kernels.packing import output_major

MAX_WIDTH = 16
WEIGHT_LAYOUTS = ("k-major", "output-major")


def _kernels():
    try:
        from fxpress.kernels import triton_matmul, triton_ops
    except ImportError as exc:
        raise LoweringError(f"the Triton backend needs the `triton` package, which does not import here: {exc}") \
            from exc
    return triton_ops, triton_matmul


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LoweringError("lowering to 'cuda' needs a CUDA GPU, and torch sees none here; on the CPU, "
                                "set TRITON_INTERPRET=1 before importing fxpress and lower to 'cpu'")
        return
    if device.type != "cpu":
        raise LoweringError(f"the Triton backend runs on 'cuda' (or 'cpu' under TRITON_INTERPRET=1), "
                            f"not {device.type!r}")
    if not interpreting():
        raise LoweringError("Triton kernels run on the CPU only in the interpreter: set TRITON_INTERPRET=1 "
                            "before importing fxpress, or lower to 'cuda'")
    _, triton_matmul = _kernels()
    if type(triton_matmul._lowbit_matmul_kernel).__name__ != "InterpretedFunction":
        raise LoweringError("fxpress's Triton kernels were imported before TRITON_INTERPRET=1 was set; "
                            "set it before importing fxpress")


def unsupported_reason(module: nn.Module) -> str | None:
    """Return why a low-bit layer cannot run the Triton kernels, or None when it can."""
    packed, scale = module.packed, module.scale
    rows = module.weight_shape[0]
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != rows:
        return f"packed codes are {tuple(packed.shape)} {packed.dtype}, not the int32 (words, {rows}) layout"
    if not 1 <= module.width <= MAX_WIDTH:
        return f"{module.width}-bit fields are outside 1..{MAX_WIDTH}"
    if not scale.is_floating_point() or scale.dim() not in (1, 2) or scale.shape[0] != rows:
        return f"scale of shape {tuple(scale.shape)} is neither per-channel ({rows},) nor group-wise ({rows}, G)"
    if scale.dim() == 2 and not 1 <= scale.shape[1] <= module.cols:
        return f"{scale.shape[1]} scale groups for {module.cols} inputs"
    if isinstance(module, LowBitConv2d) and len(module.weight_shape) != 4:
        return f"conv weight shape {module.weight_shape} is not 4-D"
    return None


def lower(target: Any, device: str | torch.device = "cuda", dtype: torch.dtype | None = None,
          model: Any = None, weight_layout: str = "k-major") -> nn.Module:
    """Return the compressed model on `device`, its low-bit layers running the Triton kernels.

    `target` is an artifact directory (loaded first; `model=` as in fxpress.load), a Graph, a
    CompressResult or a module; modules are lowered in place, like `.to()`. `dtype` casts the
    floating-point weights and so the activations (e.g. torch.float16). Layers the kernels do not
    cover keep the torch reference, each with a LoweringWarning that names it. `weight_layout`
    'output-major' stores each output's packed words contiguously (packing.output_major: wide loads
    for the small-M kernel), once, here. Only this model's layers change kernels; `unlower(module)`
    sets them back to the reference (and the words back to the k-major layout).
    """
    if weight_layout not in WEIGHT_LAYOUTS:
        raise LoweringError(f"unknown weight layout {weight_layout!r}; known: {', '.join(WEIGHT_LAYOUTS)}")
    dev = torch.device(device)
    _check_device(dev)
    module = as_module(target, model)
    layers = [(p, m) for p, m in module.named_modules() if isinstance(m, (LowBitLinear, LowBitConv2d))]
    if not layers:
        raise LoweringError(f"{type(module).__name__} holds no low-bit layers to lower; compress it first")
    reasons = {path: unsupported_reason(m) for path, m in layers}
    triton_ops, _ = _kernels()
    module.to(device=dev, dtype=dtype)
    for path, layer in layers:
        layer.fallback = reasons[path]
        layer.kernels = ops.REFERENCE if reasons[path] else triton_ops.NAME
        if weight_layout == "output-major" and not reasons[path]:
            layer.packed = output_major(layer.packed)
        if reasons[path]:
            warnings.warn(f"layer {path!r} keeps the torch reference path: {reasons[path]}", LoweringWarning,
                          stacklevel=2)
    return module


def unlower(module: nn.Module) -> nn.Module:
    """Return `module` with every low-bit layer back on the torch reference ops (on the device it is on)."""
    for layer in module.modules():
        if isinstance(layer, (LowBitLinear, LowBitConv2d)):
            layer.kernels, layer.fallback = ops.REFERENCE, None
            layer.packed = layer.packed.contiguous()
    return module
