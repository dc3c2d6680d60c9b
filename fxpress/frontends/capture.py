"""Capture an nn.Module into an fxpress Graph with torch.export (non-strict)."""

from __future__ import annotations

import copy
import traceback
from typing import Any

import torch
from torch import nn

from fxpress.errors import CaptureError
from fxpress.frontends.model_source import describe_source
from fxpress.ir.branches import mark_branches
from fxpress.ir.graph import Graph, Inputs


def _user_frame(exc: BaseException) -> str:
    """Return 'file:line in func' of the deepest frame outside torch, or ''."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "/fxpress/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} in {frame.name}: {frame.line}"
    return ""


def capture(model: nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None, *,
            calibration: list[Inputs] | None = None, dynamic_shapes: Any = None) -> Graph:
    """Capture `model` called with `args`/`kwargs` into a Graph; the model is not changed.

    Raises CaptureError naming the module path being run and the source line that failed.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs a torch.nn.Module, got {type(model).__name__}")
    kwargs = dict(kwargs or {})
    stack: list[str] = []
    names = {id(m): name or "<root>" for name, m in model.named_modules()}
    deepest: list[str] = []

    def enter(module: nn.Module, _args: Any) -> None:
        stack.append(names.get(id(module), "?"))
        deepest[:] = list(stack)

    def leave(module: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        exported = torch.export.export(model, tuple(args), kwargs, strict=False,
                                       dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # torch raises many types; all mean "not capturable"
        where = stack[-1] if stack else (deepest[-1] if deepest else "<root>")
        line = _user_frame(exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"could not capture {type(model).__name__}: failed in module {where!r}"
            + (f" at {line}" if line else "")
            + f": {type(exc).__name__}: {first}. Try: make data-dependent Python control flow "
            "depend on shapes or use torch.cond, pass example inputs with batch >= 2, or wrap the "
            "failing submodule so its forward takes only tensors."
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    graph = Graph.from_export(model, exported, Inputs(tuple(args), kwargs), calibration, describe_source(model))
    if isinstance(getattr(model, "wrapped", None), nn.Module) and callable(getattr(model, "describe", None)):
        graph.extras["wrapper"] = model.describe()  # e.g. a guidance input: saved so loading rebuilds it
    if isinstance(getattr(model, "fxpress_sampler", None), dict):
        graph.extras["sampler"] = model.fxpress_sampler  # a loaded distilled model keeps its own sampler
    if isinstance(getattr(model, "fxpress_branches", None), dict):
        graph.extras["branches"] = copy.deepcopy(model.fxpress_branches)  # a loaded model's adapters
        mark_branches(graph)
    return graph
