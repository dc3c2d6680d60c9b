"""What a backend can be handed: an artifact directory, a Graph, a CompressResult, or a module."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from fxpress.backends.torch_load import load
from fxpress.errors import LoweringError
from fxpress.ir.graph import Graph
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear

Row = TypeVar("Row")


@dataclass
class ExportedLayer:
    """What one low-bit layer became in an exported file; `reason` says why it could not stay low-bit."""

    module: str
    kind: str
    width: int
    stored_as: str
    bytes: int
    reason: str = ""

Converter = Callable[[str, LowBitLinear | LowBitConv2d], tuple[nn.Module, Row]]


def as_module(target: Any, model: Any = None) -> nn.Module:
    """Return the model `target` stands for; artifact directories are loaded (`model=` as in fxpress.load)."""
    if isinstance(target, (str, Path)):
        return load(target, model=model)
    if isinstance(target, Graph):
        return target.module
    if isinstance(getattr(target, "graph", None), Graph):  # a CompressResult
        return target.graph.module
    if isinstance(target, nn.Module):
        return target
    raise LoweringError(f"expected an artifact directory, a Graph, a CompressResult or an nn.Module, "
                        f"not {type(target).__name__}")


def first_tensor(output: Any) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, a tuple/list, or a diffusers/transformers output)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    if hasattr(output, "to_tuple"):
        return first_tensor(output.to_tuple()[0])
    raise TypeError(f"cannot find a tensor in a {type(output).__name__} output")


def replace_lowbit_layers(module: nn.Module, convert: Converter) -> tuple[nn.Module, list[Row]]:
    """Return an eval-mode deep copy of `module` with each low-bit layer replaced by `convert(name, layer)[0]`,
    and the rows `convert` returned, in module order. The user's module is not touched."""
    converted = copy.deepcopy(module)
    rows = []
    for name, layer in list(converted.named_modules()):
        if isinstance(layer, (LowBitLinear, LowBitConv2d)):
            replacement, row = convert(name, layer)
            parent, _, child = name.rpartition(".")
            setattr(converted.get_submodule(parent) if parent else converted, child, replacement)
            rows.append(row)
    return converted.eval(), rows


def module_path(node: torch.fx.Node) -> str:
    """The module path an exported node came from (its innermost nn_module_stack entry)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    return path or "<top level>"


def locate_refused_op(message: str, exported: torch.export.ExportedProgram) -> str:
    """' (node N, module M)' for the first graph node whose op a converter's `message` names, else ''."""
    names = [m for pair in re.findall(r"aten\.(\w+)|op '(\w+)'|fx node (\w+)", message) for m in pair if m]
    for node in exported.graph.nodes:
        op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if node.op == "call_function" and any(n in (op, node.name) or op.endswith("_" + n) for n in names):
            return f" (node {node.name!r}, module {module_path(node)!r})"
    return ""
