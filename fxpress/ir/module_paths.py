"""Read and replace submodules by dotted module path (the layer names used everywhere)."""

from __future__ import annotations

from torch import nn


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at `path` inside `root` and return the module it replaced; AttributeError if absent."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = parent.get_submodule(name)
    setattr(parent, name, new)
    return old
