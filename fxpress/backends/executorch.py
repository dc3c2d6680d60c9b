"""Export a compressed model to an ExecuTorch program (.pte) delegated to XNNPACK.

Two weight modes:
- "lowbit" (default): each low-bit layer becomes XNNPACK's dynamically quantized GEMM (int8
  activations chosen per call) with its codes stored at 4 bits (linear, codes in [-8, 7]) or 8 bits
  (conv, or wider codes). Layers XNNPACK cannot take this way keep a dequantized fp32 weight, and
  the report says which and why. The int8 activations cost accuracy (4e-3 to 2e-2 relative on
  the zoo models).
- "float": every low-bit layer is dequantized to fp32; the program computes what the torch
  backend computes (about 1e-6), at 32 bits per weight.

ExecuTorch is an optional extra (`pip install fxpress[mobile]`); without it the export raises a
LoweringError that says so.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fxpress.backends.targets import (
    ExportedLayer,
    as_module,
    first_tensor,
    locate_refused_op,
    module_path,
    replace_lowbit_layers,
)
from fxpress.errors import LoweringError
from fxpress.ir.graph import Inputs
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear

WEIGHT_MODES = ("lowbit", "float")


@dataclass
class ExecuTorchReport:
    """The written program, its size, how much of it XNNPACK runs, and each low-bit layer's storage."""

    path: Path
    file_bytes: int
    weights: str
    delegated_calls: int
    portable_ops: list[str] = field(default_factory=list)
    layers: list[ExportedLayer] = field(default_factory=list)


def _require_executorch() -> None:
    try:
        import executorch.exir  # noqa: F401
    except ImportError as exc:
        raise LoweringError("ExecuTorch is not installed: pip install 'fxpress[mobile]'") from exc


def _lowbit_choice(layer: LowBitLinear | LowBitConv2d) -> tuple[int, int, str] | str:
    """(qmin, qmax, label) of the XNNPACK storage that holds the layer's codes exactly, or why none does."""
    if layer.scale.dim() != 1:
        return "group-wise scales (XNNPACK's 4-bit blockwise GEMM rounds scales to bf16)"
    codes = layer.codes()
    low, high = int(codes.min()), int(codes.max())
    if isinstance(layer, LowBitConv2d):
        if layer.groups != 1:
            return f"groups={layer.groups} (XNNPACK quantizes only groups=1 convs dynamically)"
        if -127 <= low and high <= 127:
            return -127, 127, "int8 (qc8w)"
        return f"codes in [{low}, {high}] exceed XNNPACK's [-127, 127]"
    if -8 <= low and high <= 7:
        return -8, 7, "int4 (qc4w)"
    if -127 <= low and high <= 127:
        return -127, 127, "int8 (qc8w)"
    return f"codes in [{low}, {high}] exceed XNNPACK's [-127, 127]"


def _convert_layer(name: str, layer: LowBitLinear | LowBitConv2d, weights: str) -> tuple[nn.Module, ExportedLayer]:
    """The module that replaces `layer` in the exported copy, and the report row saying what it became."""
    from fxpress.backends.executorch_layers import XnnpackConv2d, XnnpackLinear

    kind = "linear" if isinstance(layer, LowBitLinear) else "conv2d"
    rows, numel = layer.weight_shape[0], int(np.prod(layer.weight_shape))
    bias_bytes = 4 * rows if layer.bias is not None else 0
    choice = "float weights requested" if weights == "float" else _lowbit_choice(layer)
    if isinstance(choice, str):
        return layer.to_dense(), ExportedLayer(name, kind, layer.width, "fp32", 4 * numel + bias_bytes,
                                                 "" if weights == "float" else choice)
    qmin, qmax, label = choice
    codes = layer.codes().reshape(layer.weight_shape)
    if kind == "linear":
        replacement = XnnpackLinear(codes, layer.scale, layer.bias, qmin, qmax)
    else:
        replacement = XnnpackConv2d(codes, layer.scale, layer.bias, qmin, qmax, layer.stride, layer.padding,
                                    layer.dilation)
    code_bytes = (numel + 1) // 2 if qmax == 7 else numel
    return replacement, ExportedLayer(name, kind, layer.width, label, code_bytes + 4 * rows + bias_bytes)


def convert_for_executorch(module: nn.Module, weights: str = "lowbit") -> tuple[nn.Module, list[ExportedLayer]]:
    """Return a copy of `module` with each low-bit layer replaced for XNNPACK, and what each became."""
    if weights not in WEIGHT_MODES:
        raise LoweringError(f"weights must be one of {WEIGHT_MODES}, not {weights!r}")
    return replace_lowbit_layers(module, lambda name, layer: _convert_layer(name, layer, weights))


def _op_name(target: Any) -> str:
    schema = getattr(target, "_schema", None)
    if schema is None:
        return str(target)
    return f"{schema.name}.{schema.overload_name}" if schema.overload_name else schema.name


def _check_operators(program) -> list[str]:
    """Return the operators left outside the delegate; raise if the Python runtime lacks a kernel for one."""
    from executorch.extension.pybindings.portable_lib import _get_operator_names

    available = set(_get_operator_names())
    used = []
    for node in program.exported_program().graph.nodes:
        if node.op != "call_function" or getattr(node.target, "_schema", None) is None:
            continue   # delegate calls, getitem and ExecuTorch's memory planning ops need no kernel
        name = _op_name(node.target)
        if name not in available:
            raise LoweringError(f"ExecuTorch has no kernel for {name} (node {node.name!r}, module "
                                f"{module_path(node)!r}); it is neither delegated to XNNPACK nor in the runtime")
        used.append(name)
    return sorted(set(used))


def _one_use_per_constant():
    """An ExecuTorch edge pass giving each weight placeholder used by several nodes one placeholder per user
    (all naming the same weight). Without it, lowering copies each weight shared across delegates and
    revalidates the whole program per copy: minutes for an unrolled sampler, whose N steps share every
    weight. XNNPACK and the emitter store constants by content hash, so the file holds each weight once."""
    from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult
    from executorch.exir.pass_manager import ExportedProgramPassManager
    from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

    class OneUsePerConstant(ExportedProgramPassBase):
        def call(self, program: torch.export.ExportedProgram) -> ExportedProgramPassResult:
            graph, specs, modified = program.graph, [], False
            placeholders = [n for n in graph.nodes if n.op == "placeholder"]
            for node, spec in zip(placeholders, program.graph_signature.input_specs, strict=True):
                users = list(node.users)
                if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                    for i, user in enumerate(users[1:], start=1):
                        with graph.inserting_before(node):
                            copy = graph.placeholder(f"{node.name}_use{i}")
                        copy.meta.update(node.meta)
                        user.replace_input_with(node, copy)
                        specs.append(InputSpec(spec.kind, TensorArgument(copy.name), spec.target, spec.persistent))
                        modified = True
                specs.append(spec)
            program.graph_signature.input_specs = specs
            program.graph_module.recompile()
            return ExportedProgramPassResult(program, modified)

    return ExportedProgramPassManager([OneUsePerConstant()])


def export_executorch(target: Any, example_inputs: Any, path: str | Path, model: Any = None,
                      weights: str = "lowbit", fold: bool = False) -> ExecuTorchReport:
    """Export a compressed model (artifact directory, Graph, CompressResult or module) to an XNNPACK .pte file.

    `weights` is "lowbit" (XNNPACK int4/int8 weights, int8 activations) or "float" (dequantized fp32,
    exact). `fold` precomputes what depends on no input (`ir.constant_fold`: an unrolled sampler's
    timestep embeddings). The file appears only once lowering has succeeded; nothing is left behind on failure.
    """
    _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    module = as_module(target, model)
    converted, layers = convert_for_executorch(module, weights)
    inputs = Inputs.of(example_inputs)
    try:
        exported = torch.export.export(converted, tuple(inputs.args), kwargs=dict(inputs.kwargs), strict=False)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds; all mean "cannot capture"
        raise LoweringError(f"torch.export could not capture {type(module).__name__}: {_clean(exc)}") from exc
    if fold:
        from fxpress.ir.constant_fold import fold_constants

        folded, _ = fold_constants(exported)
        exported = torch.export.export(folded, tuple(inputs.args), kwargs=dict(inputs.kwargs), strict=False)
    try:
        edge = to_edge_transform_and_lower(exported, transform_passes=_one_use_per_constant(),
                                           partitioner=[XnnpackPartitioner()])
        program = edge.to_executorch()
    except Exception as exc:  # noqa: BLE001 - lowering errors come from many layers of ExecuTorch
        where = locate_refused_op(str(exc), exported)
        raise LoweringError(f"ExecuTorch could not lower {type(module).__name__}{where}: {_clean(exc)}") from exc
    portable = _check_operators(program)
    delegated = sum(1 for n in program.exported_program().graph.nodes if "executorch_call_delegate" in str(n.target))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".pte.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            program.write_to_file(handle)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExecuTorchReport(path, path.stat().st_size, weights, delegated, portable, layers)


def _clean(exc: Exception) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))[:1500]


def run_executorch(path: str | Path, example_inputs: Any) -> list[torch.Tensor]:
    """Run the .pte's forward in ExecuTorch's Python runtime on the tensors of `example_inputs`."""
    _require_executorch()
    from executorch.runtime import Runtime

    inputs = Inputs.of(example_inputs)
    flat = [v for v in [*inputs.args, *inputs.kwargs.values()] if isinstance(v, torch.Tensor)]
    method = Runtime.get().load_program(Path(path)).load_method("forward")
    return list(method.execute(flat))


def compare_with_executorch(module: nn.Module, example_inputs: Any, path: str | Path) -> float:
    """Relative error of the .pte's first output against `module` (the torch backend) on `example_inputs`."""
    inputs = Inputs.of(example_inputs)
    with torch.no_grad():
        reference = first_tensor(module(*inputs.args, **inputs.kwargs)).float()
    out = run_executorch(path, example_inputs)[0].float()
    return float((out - reference).norm() / reference.norm().clamp_min(1e-12))
