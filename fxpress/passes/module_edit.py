"""Small helpers to read and replace submodules by their dotted path."""

from __future__ import annotations

from torch import nn


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at `path` inside `root` and return the module it replaced."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = parent.get_submodule(name)
    setattr(parent, name, new)
    return old


def timestep_input(graph_input_names: list[str], preferred: str | None = None) -> str | None:
    """Return the model input that carries the diffusion timestep, if any."""
    if preferred:
        return preferred if preferred in graph_input_names else None
    return next((n for n in graph_input_names if n in ("timestep", "timesteps", "t")), None)
