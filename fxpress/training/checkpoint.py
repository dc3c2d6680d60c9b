"""Resumable training checkpoints: model, EMA and optimizer tensors in safetensors, the rest in JSON.

Nothing is pickled. A checkpoint is written to a temporary sibling directory and renamed into place,
so an interrupted write never replaces a good checkpoint with a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fxpress.errors import ArtifactError


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(directory: str | Path, step: int, modules: dict[str, nn.Module],
                    optimizer: torch.optim.Optimizer, extra: dict[str, Any] | None = None) -> Path:
    """Write modules' state dicts, the optimizer state and `step` atomically; return the directory."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tensors = {f"{name}::{k}": v.detach().cpu().contiguous()
                   for name, module in modules.items() for k, v in module.state_dict().items()}
        optim_tensors, optim_meta = _optimizer_tensors(optimizer)
        save_file({**tensors, **optim_tensors}, str(tmp / "state.safetensors"))
        meta = {"step": step, "optimizer": optim_meta, "modules": sorted(modules), "extra": extra or {}}
        (tmp / "checkpoint.json").write_text(json.dumps(meta))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_checkpoint(directory: str | Path, modules: dict[str, nn.Module],
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore modules and optimizer from a checkpoint; return its JSON metadata (with `step`).

    Raises ArtifactError when the checkpoint is unreadable or does not match the modules.
    """
    path = Path(directory)
    try:
        meta = json.loads((path / "checkpoint.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ArtifactError(f"cannot read checkpoint {path}: {exc}") from exc
    if sorted(modules) != meta.get("modules"):
        raise ArtifactError(f"checkpoint {path} holds {meta.get('modules')}, expected {sorted(modules)}")
    try:
        for name, module in modules.items():
            prefix = f"{name}::"
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for key, value in meta["optimizer"]["scalars"].items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ArtifactError(f"checkpoint {path} does not fit the model being trained: {exc}") from exc
    return meta
