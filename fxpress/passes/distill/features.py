"""Block features for distillation: which modules' outputs to match, and hooks that record them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fxpress.ir.graph import output_tensors


def block_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Return the blocks whose outputs feature distillation matches: each item of a top-level
    ModuleList (down_blocks.0, transformer_blocks.3, ...) and top-level modules named like 'mid'."""
    blocks = {}
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            blocks.update({f"{name}.{i}": item for i, item in enumerate(child)})
        elif "mid" in name:
            blocks[name] = child
    return blocks


class FeatureTap:
    """Records the first output tensor of each given module on every forward."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def record(module, args, output):
            tensors = output_tensors(output)
            if tensors:
                self.values[name] = tensors[0]
        return record

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
