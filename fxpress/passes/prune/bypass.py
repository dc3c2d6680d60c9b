"""Block removal: replace a residual block by a module that returns its stream input unchanged.

Which argument is the stream is found by running the model once and looking at each block's call:
the one tensor argument shaped like the block's output. `bypass_hooks` gives the same behaviour as
forward hooks on the original model (for masking while scoring); `bypass_blocks` swaps the modules
for `Bypass` so the parameters are gone. `validate_bypass` tries the swap for real first: a model
whose own code reaches into a block (DiT computes its final conditioning with the first block's
embedding) cannot lose that block, and says why.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from fxpress.errors import PassError
from fxpress.ir.module_paths import replace_submodule
from fxpress.kernels.bypass import Bypass, StreamArg
from fxpress.passes.prune.remove import check_removal
from fxpress.passes.prune.validate import find_failures


def _stream_arg(path: str, args: tuple, kwargs: dict[str, Any], output: Any) -> StreamArg:
    first = output[0] if isinstance(output, tuple) and output else output
    if not isinstance(first, torch.Tensor) or (isinstance(output, tuple) and any(
            o is not None for o in output[1:])):
        raise PassError("a block must return a tensor (or a tuple holding one tensor)", "BypassBlocks",
                        module_path=path)
    matches = [(i, None) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.shape == first.shape]
    matches += [(None, k) for k, a in kwargs.items() if isinstance(a, torch.Tensor) and a.shape == first.shape]
    if len(matches) != 1:
        raise PassError(f"{len(matches)} arguments of the block are shaped like its output {list(first.shape)}; "
                        "cannot tell which one is the stream", "BypassBlocks", module_path=path)
    return StreamArg(matches[0][0], matches[0][1], isinstance(output, tuple))


@torch.no_grad()
def find_stream_args(model: nn.Module, paths: list[str],
                     inputs: dict[str, Any]) -> tuple[dict[str, StreamArg], dict[str, str]]:
    """Run `model` once on `inputs`; return where each block's stream input is, and the blocks that
    cannot be bypassed with the reason (called more than once, ambiguous stream, never run)."""
    found: dict[str, StreamArg] = {}
    refused: dict[str, str] = {}
    calls: dict[str, int] = {}
    handles = []
    for path in paths:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any, path: str = path) -> None:
            calls[path] = calls.get(path, 0) + 1
            try:
                found[path] = _stream_arg(path, args, kwargs, output)
            except PassError as exc:
                refused[path] = str(exc)
        handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    try:
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    for path in paths:
        if calls.get(path, 0) != 1:
            refused[path] = f"called {calls.get(path, 0)} times on the example inputs"
    return {p: s for p, s in found.items() if p not in refused}, refused


def bypass_hooks(model: nn.Module, streams: dict[str, StreamArg]) -> list:
    """Make each block return its stream input (forward hooks); return the handles to remove later."""
    handles = []
    for path, stream in streams.items():
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any, stream: StreamArg = stream) -> Any:
            return stream.result(stream.pick(args, kwargs))
        handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    return handles


def _bypass_trial(model: nn.Module, streams: dict[str, StreamArg], inputs: list[dict]) -> str | None:
    """Return None when swapping these blocks for Bypass matches bypassing them by hooks, else why not."""
    pruned = copy.deepcopy(model)
    bypass_blocks(pruned, streams)
    handles = bypass_hooks(model, streams)
    try:
        check_removal(pruned, model, inputs)
    except PassError as exc:
        return str(exc)
    finally:
        for handle in handles:
            handle.remove()
    return None


@torch.no_grad()
def validate_bypass(model: nn.Module, streams: dict[str, StreamArg],
                    inputs: list[dict]) -> tuple[dict[str, StreamArg], dict[str, str]]:
    """Return the blocks that can really be removed, and the others with the reason (tried all at once,
    halved only on failure, as for dependency groups)."""
    failed = find_failures(list(streams), lambda paths: _bypass_trial(model, {p: streams[p] for p in paths},
                                                                     inputs))
    refused = {p: f"removing the block breaks the model: {reason}" for p, reason in failed.items()}
    return {p: s for p, s in streams.items() if p not in refused}, refused


def bypass_blocks(model: nn.Module, streams: dict[str, StreamArg]) -> int:
    """Replace each block by a Bypass in place; return the number of parameters removed."""
    removed = 0
    for path, stream in streams.items():
        old = replace_submodule(model, path, Bypass(stream, path))
        removed += sum(p.numel() for p in old.parameters())
    return removed
