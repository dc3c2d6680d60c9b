"""`InsertLoRA`: put a zero-initialised low-rank branch beside each selected linear / conv layer."""

from __future__ import annotations

import torch

from fxpress.errors import PassError, RecipeError
from fxpress.ir.graph import Graph
from fxpress.ir.select import select
from fxpress.kernels.lora import CONV_TYPES, LINEAR_TYPES, LoRA, lora_geometry
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.module_edit import replace_submodule
from fxpress.passes.quant.select_layers import layer_candidates
from fxpress.passes.rewire.branches import check_new_name, recaptured, registry


def lora_candidates(graph: Graph) -> dict[str, tuple[str, str]]:
    """{path: (class name, kind)} of the layers a LoRA branch can wrap: linear and conv layers (float or
    low-bit) that are not themselves part of a branch or already wrapped."""
    model = graph.module
    wrapped = {p for p, m in model.named_modules() if isinstance(m, LoRA)}
    return {path: entry for path, entry in layer_candidates(graph).items()
            if isinstance(model.get_submodule(path), LINEAR_TYPES + CONV_TYPES)
            and graph.annotation(path).branch is None and path.rpartition(".")[0] not in wrapped}


class InsertLoRA(Pass):
    """Wrap each layer `targets` selects (`fxpress.ir.select`: bare entries are path-suffix regexes) in a
    `LoRA` branch of rank `rank`; the model's output is unchanged until the branch trains."""

    provides = ("branches",)
    transforms = True

    def __init__(self, targets: list[str] | str, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 name: str = "lora", role: str = "adapter", scale: float = 1.0, seed: int = 0):
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets:
            raise RecipeError("InsertLoRA needs at least one target")
        if not isinstance(rank, int) or rank < 1:
            raise RecipeError(f"InsertLoRA: rank must be a positive integer, got {rank!r}")
        if role not in ("adapter", "train_only"):
            raise RecipeError(f"InsertLoRA: role must be 'adapter' or 'train_only', got {role!r}")
        self.rank, self.alpha, self.dropout = rank, alpha, float(dropout)
        self.branch, self.role, self.scale, self.seed = name, role, float(scale), seed

    def run(self, graph: Graph) -> PassResult:
        check_new_name(graph, self.branch, self.name)
        chosen = select(self.targets, lora_candidates(graph), what="LoRA target")
        model = graph.module
        generator = torch.Generator().manual_seed(self.seed)
        added = 0
        for path in chosen:
            base = model.get_submodule(path)
            try:
                lora_geometry(base)
                wrapper = LoRA(base, self.rank, self.alpha, self.dropout, self.scale, generator)
            except ValueError as exc:
                raise PassError(f"layer {path!r}: {exc}", self.name) from exc
            wrapper.to(next((t.device for t in (*base.parameters(), *base.buffers())), torch.device("cpu")))
            replace_submodule(model, path, wrapper)
            added += sum(p.numel() for n, p in wrapper.named_parameters() if n.startswith("lora_"))
        registry(graph)[self.branch] = {
            "kind": "lora", "role": self.role, "scale": self.scale, "targets": list(chosen),
            "rank": self.rank, "alpha": float(self.rank if self.alpha is None else self.alpha),
            "dropout": self.dropout, "fused": False, "params": added,
        }
        new = recaptured(graph, model, {p: f"{p}.base_layer" for p in chosen})
        return PassResult(new, True, {"branch": self.branch, "layers": len(chosen), "params": added,
                                      "rank": self.rank, "role": self.role, "targets": self.targets})

