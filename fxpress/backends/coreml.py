"""Export a compressed model to a Core ML mlpackage whose low-bit layers are palettized at fxpress's widths.

The model is captured with torch.export (each low-bit layer as a dense layer holding its
dequantized weight) and converted by coremltools to an ML program. Each low-bit layer's weight is
then palettized with one lookup table per output channel: fxpress's weight is code x scale[channel],
so a channel holds at most `levels` distinct values and the table is exactly those values. The
table has 2^bits entries, bits being the smallest Core ML palette width (1, 2, 3, 4, 6, 8) that
holds the layer's code width: 1-4 and 6/8-bit layers keep their width, 5 and 7 bits take 6 and 8.
Layers wider than 8 bits, or with group-wise scales, stay fp16 and the report says so.

Running a prediction needs macOS; `read_palettization` reads the widths back from the package.
coremltools is an optional extra (`pip install fxpress[mobile]`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fxpress.backends.targets import ExportedLayer, as_module, locate_refused_op, replace_lowbit_layers
from fxpress.errors import LoweringError
from fxpress.ir.graph import Inputs
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear

PALETTE_BITS = (1, 2, 3, 4, 6, 8)
PRECISIONS = ("float16", "float32")
LAYERS_METADATA = "fxpress.palettized_layers"   # user-defined metadata: {constant name: module path}


@dataclass
class CoreMLReport:
    """The written mlpackage, its size, each low-bit layer's storage, and the palettized weights' largest error."""

    path: Path
    package_bytes: int
    precision: str
    layers: list[ExportedLayer] = field(default_factory=list)
    max_weight_error: float = 0.0   # max |LUT weight - fxpress weight| / max |fxpress weight|, over layers


def _require_coremltools():
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("coremltools").setLevel(logging.ERROR)
            import coremltools
    except ImportError as exc:
        raise LoweringError("coremltools is not installed: pip install 'fxpress[mobile]'") from exc
    return coremltools


def palette_bits(width: int) -> int | None:
    """The narrowest Core ML palette width holding `width`-bit codes, or None above 8 bits."""
    return next((b for b in PALETTE_BITS if b >= width), None)


def _plan(name: str, layer: LowBitLinear | LowBitConv2d, element_bytes: int) -> tuple[nn.Module, ExportedLayer]:
    kind = "linear" if isinstance(layer, LowBitLinear) else "conv2d"
    rows, numel = layer.weight_shape[0], int(np.prod(layer.weight_shape))
    bits = palette_bits(layer.width)
    reason = ("group-wise scales (a channel holds more values than one table)" if layer.scale.dim() != 1
              else "" if bits else f"{layer.width}-bit codes exceed Core ML's 8-bit palettes")
    if reason:
        return layer.to_dense(), ExportedLayer(name, kind, layer.width, f"fp{8 * element_bytes}",
                                             numel * element_bytes, reason)
    size = (numel * bits + 7) // 8 + rows * (1 << bits) * element_bytes
    return layer.to_dense(), ExportedLayer(name, kind, layer.width, f"LUT uint{bits} per channel", size)


def _lut_function(bits: int, module: str):
    """coremltools custom palettizer: one channel's distinct values, padded to 2^bits, and their indices."""
    def lut_and_indices(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distinct, indices = np.unique(values.reshape(-1), return_inverse=True)
        if len(distinct) > 1 << bits:
            raise LoweringError(f"layer {module!r}: a channel holds {len(distinct)} distinct weights, "
                                f"more than a {bits}-bit table")
        lut = np.zeros(1 << bits, dtype=values.dtype)
        lut[: len(distinct)] = distinct
        return lut, indices.astype(np.uint8)
    return lut_and_indices


def _weight_constants(program, parameter_names: dict[str, str]) -> dict[str, str]:
    """{MIL constant name: parameter name} for the converted program's weight constants."""
    found = {}
    for op in program.functions["main"].operations:
        if op.op_type == "const":
            base = re.sub(r"_to_fp(16|32)$", "", op.name)
            if base in parameter_names:
                found[op.name] = parameter_names[base]
    return found


def _palettized_error(program, constants: dict[str, str], reference: dict[str, torch.Tensor]) -> float:
    """Largest |table weight - fxpress weight| relative to the layer's largest weight, over palettized layers."""
    worst = 0.0
    for op in program.functions["main"].operations:
        if op.op_type != "constexpr_lut_to_dense":
            continue
        name = re.sub(r"_palettized$", "", op.outputs[0].name)
        indices, lut = op.inputs["indices"].val, op.inputs["lut"].val
        channel_lut = lut.reshape(lut.shape[0], -1)                 # (out channels, 2^bits)
        flat = indices.reshape(indices.shape[0], -1).astype(np.int64)
        dense = np.take_along_axis(channel_lut, flat, axis=1).astype(np.float32)
        expected = reference[constants[name]].reshape(dense.shape).numpy()
        worst = max(worst, float(np.abs(dense - expected).max() / max(np.abs(expected).max(), 1e-30)))
    return worst


def _drop_aliases(exported: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Bypass `aten.alias` nodes (views that change nothing), which coremltools' converter does not know."""
    graph, aliases = exported.graph_module.graph, (torch.ops.aten.alias.default, torch.ops.aten.alias_copy.default)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in aliases:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    exported.graph_module.recompile()
    return exported


def export_coreml(target: Any, example_inputs: Any, path: str | Path, model: Any = None,
                  precision: str = "float16") -> CoreMLReport:
    """Convert a compressed model (artifact directory, Graph, CompressResult or module) to a palettized mlpackage.

    `precision` is the ML program's compute precision ("float16" or "float32"). The package appears
    only once conversion and palettization have succeeded; nothing is left behind on failure.
    """
    ct = _require_coremltools()
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    if precision not in PRECISIONS:
        raise LoweringError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    element_bytes = 2 if precision == "float16" else 4
    module = as_module(target, model)
    dense, layers = replace_lowbit_layers(module, lambda name, layer: _plan(name, layer, element_bytes))
    inputs = Inputs.of(example_inputs)
    try:
        exported = torch.export.export(dense, tuple(inputs.args), kwargs=dict(inputs.kwargs), strict=False)
        exported = _drop_aliases(exported.run_decompositions({}))
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds; all mean "cannot capture"
        raise LoweringError(f"torch.export could not capture {type(module).__name__}: {str(exc)[:1500]}") from exc
    parameters = exported.graph_signature.inputs_to_parameters
    try:
        with _quiet():
            converted = ct.convert(exported, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                                   compute_precision=getattr(ct.precision, precision.upper()))
    except Exception as exc:  # noqa: BLE001 - the converter raises many kinds; all mean "cannot convert"
        where = locate_refused_op(str(exc), exported)
        raise LoweringError(f"coremltools could not convert {type(module).__name__}{where}: {str(exc)[:1500]}") from exc
    constants = _weight_constants(converted._mil_program, parameters)
    by_parameter = {f"{layer.module}.weight": layer for layer in layers if layer.stored_as.startswith("LUT")}
    configs = {const: OpPalettizerConfig(mode="custom", granularity="per_grouped_channel", group_size=1,
                                         weight_threshold=0,
                                         lut_function=_lut_function(palette_bits(by_parameter[p].width), p))
               for const, p in constants.items() if p in by_parameter}
    missing = set(by_parameter) - set(constants.values())
    if missing:
        raise LoweringError(f"coremltools folded or renamed the weights of {sorted(missing)[:5]}; "
                            "they cannot be palettized")
    with _quiet():
        palettized = palettize_weights(converted, OptimizationConfig(op_name_configs=configs))
    reference = {p: dense.get_parameter(p).detach() for p in by_parameter}
    error = _palettized_error(palettized._mil_program, constants, reference)
    palettized.user_defined_metadata[LAYERS_METADATA] = json.dumps(
        {const: p.removesuffix(".weight") for const, p in constants.items() if p in by_parameter})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        staged = scratch / path.name
        with _quiet():
            palettized.save(str(staged))
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(staged, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return CoreMLReport(path, size, precision, layers, error)


def read_palettization(path: str | Path) -> dict[str, int]:
    """Read an mlpackage back: {module path (or constant name): palette bits} of each lookup-table weight."""
    ct = _require_coremltools()
    from coremltools.proto import MIL_pb2

    try:
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    except Exception as exc:  # noqa: BLE001 - a missing or corrupt package
        raise LoweringError(f"{path}: not a readable mlpackage ({exc})") from exc
    names = json.loads(spec.description.metadata.userDefined.get(LAYERS_METADATA, "{}"))
    main = spec.mlProgram.functions["main"]
    widths = {}
    for op in main.block_specializations[main.opset].operations:
        if op.type == "constexpr_lut_to_dense":
            indices = op.inputs["indices"].arguments[0].value.type.tensorType.dataType
            const = re.sub(r"_palettized$", "", op.outputs[0].name)
            widths[names.get(const, const)] = int(MIL_pb2.DataType.Name(indices).removeprefix("UINT"))
    return widths


@contextlib.contextmanager
def _quiet():
    """coremltools prints progress bars and version warnings; keep them out of fxpress's output."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
