"""What `compress` checks before capture: a module, example inputs that fit its forward, real finite weights.

Each failure is a ModelError naming the parameter, buffer or input. A model in train mode is not refused:
capture would record training behaviour (dropout, batch statistics), so an eval-mode copy is captured
instead, with a warning, and the module the caller passed keeps its mode and its weights.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fxpress.errors import ModelError
from fxpress.ir.graph import Inputs


def _inputs(example_inputs: Any) -> Inputs:
    if example_inputs is None:
        raise ModelError("example_inputs is missing: pass the model's forward arguments (a tuple of args, a dict "
                         "of kwargs, or an object with .args and .kwargs)")
    if not isinstance(example_inputs, (Inputs, dict, tuple, list, torch.Tensor)) and not (
            hasattr(example_inputs, "args") and hasattr(example_inputs, "kwargs")):
        raise ModelError(f"example_inputs must be a tuple of args, a dict of kwargs or an object with .args and "
                         f".kwargs, got {type(example_inputs).__name__}")
    return Inputs.of(example_inputs)


def _named_inputs(model: nn.Module, inputs: Inputs) -> dict[str, Any]:
    """Return the inputs keyed by forward parameter name; raises ModelError when they do not fit forward."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without a Python signature: name inputs by position
        return {**{f"args[{i}]": v for i, v in enumerate(inputs.args)}, **inputs.kwargs}
    try:
        bound = signature.bind(*inputs.args, **inputs.kwargs)
    except TypeError as exc:
        names = ", ".join(signature.parameters)
        raise ModelError(f"the example inputs do not fit {type(model).__name__}.forward({names}): {exc}") from None
    return dict(bound.arguments)


def _tensors(value: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{where}[{index}]")


def _bad_values(tensor: torch.Tensor, infinite_ok: bool = False) -> str:
    """Return '' when `tensor` has real finite values, else what is wrong with it."""
    if tensor.is_meta:
        return "is on the meta device (no values)"
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return ""
    if infinite_ok:
        nan = int(torch.isnan(tensor).sum())
        return f"holds {nan} NaN values of {tensor.numel():,}" if nan else ""
    if bool(torch.isfinite(tensor).all()):
        return ""
    nan = int(torch.isnan(tensor).sum())
    return f"holds {nan} NaN and {int(torch.isinf(tensor).sum())} Inf values of {tensor.numel():,}"


def check_model(model: Any, example_inputs: Any) -> nn.Module:
    """Return the module to capture: `model` itself, or an eval-mode copy of it when it is in train mode.

    Raises ModelError when `model` is not an nn.Module, the example inputs are missing or do not fit its
    forward, an input, parameter or buffer holds NaN (parameters and inputs: or Inf), or a tensor is on
    the meta device. Buffers may hold Inf (attention masks do).
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"compress needs a torch.nn.Module, got {type(model).__name__}")
    for name, value in _named_inputs(model, _inputs(example_inputs)).items():
        for where, tensor in _tensors(value, repr(name)):
            if problem := _bad_values(tensor):
                raise ModelError(f"example input {where} of {type(model).__name__}.forward {problem}")
    for name, param in model.named_parameters():
        if problem := _bad_values(param.detach()):
            hint = "; load its weights first" if param.is_meta else "; fxpress compresses finite weights"
            raise ModelError(f"parameter {name!r} of {type(model).__name__} {problem}{hint}")
    for name, buffer in model.named_buffers():
        if problem := _bad_values(buffer, infinite_ok=True):
            raise ModelError(f"buffer {name!r} of {type(model).__name__} {problem}")
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if not training:
        return model
    warnings.warn(f"{type(model).__name__} is in train mode ({len(training)} modules, e.g. {training[0]!r}): "
                  "capturing an eval-mode copy; the model you passed keeps its mode and weights (call "
                  "model.eval() first to skip the copy)", UserWarning, stacklevel=3)
    try:
        return copy.deepcopy(model).eval()
    except Exception as exc:  # noqa: BLE001 - deepcopy fails in many ways on exotic modules
        raise ModelError(f"{type(model).__name__} is in train mode and cannot be copied ({type(exc).__name__}: "
                         f"{exc}); call model.eval() before compress") from exc
