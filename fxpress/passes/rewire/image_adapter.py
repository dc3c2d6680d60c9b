"""`InsertImageAdapter`: decoupled image cross-attention at every cross-attention (`kernels.image_adapter`)."""

from __future__ import annotations

import torch

from fxpress.errors import PassError, RecipeError
from fxpress.ir.graph import Graph, Inputs
from fxpress.ir.select import select
from fxpress.kernels.image_adapter import ImageAdapted, ImageCrossAttention, is_cross_attention, projection_shape
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.module_edit import replace_submodule
from fxpress.passes.rewire.branches import branch_modules, check_new_name, recaptured, registry, remap_paths


def context_width(attn: torch.nn.Module) -> int:
    """The width of the context (text tokens) a cross-attention reads: its key projection's input."""
    return projection_shape(attn.to_k)[1]


def adapted_path(path: str, targets: list[str]) -> str:
    """Where module `path` of the plain model lives once adapted (inside `model.`, a target's `.attn`)."""
    for t in targets:
        if path == t or path.startswith(t + "."):
            return f"model.{t}.attn{path[len(t):]}"
    return f"model.{path}"


class InsertImageAdapter(Pass):
    """Give every cross-attention (or those `targets` selects) image keys and values, and the model a new
    keyword input `input_name`: image features (N, `features`) made into `tokens` tokens by a trainable
    projector. The output is unchanged until the adapter trains."""

    provides = ("branches",)
    transforms = True

    def __init__(self, features: int, tokens: int = 4, name: str = "image", input_name: str = "image_embeds",
                 targets: list[str] | None = None, role: str = "adapter", scale: float = 1.0, seed: int = 0,
                 image_channels: int | None = None, image_size: int = 32):
        if not isinstance(features, int) or features < 1 or not isinstance(tokens, int) or tokens < 1:
            raise RecipeError(f"InsertImageAdapter: features and tokens must be positive integers, got "
                              f"{features!r}, {tokens!r}")
        if role not in ("adapter", "train_only"):
            raise RecipeError(f"InsertImageAdapter: role must be 'adapter' or 'train_only', got {role!r}")
        self.features, self.tokens, self.branch, self.input_name = features, tokens, name, input_name
        self.targets, self.role, self.scale, self.seed = targets, role, float(scale), seed
        if image_channels is not None and (not isinstance(image_channels, int) or image_channels < 1):
            raise RecipeError(f"InsertImageAdapter: image_channels must be a positive integer, got {image_channels!r}")
        self.image_channels, self.image_size = image_channels, int(image_size)

    def run(self, graph: Graph) -> PassResult:
        check_new_name(graph, self.branch, self.name)
        entries = registry(graph)
        if any(e["kind"] == "image_adapter" for e in entries.values()):
            raise RecipeError(f"{self.name}: the model has an image adapter already; one per model")
        if self.input_name in graph.input_names or self.input_name in graph.example.kwargs:
            raise RecipeError(f"{self.name}: the model already has an input named {self.input_name!r}")
        model = graph.module
        owned = [p for name in entries for p in branch_modules(graph, name)]  # other branches' own modules
        found = {p: (type(m).__name__, "attention") for p, m in model.named_modules()
                 if is_cross_attention(m) and not any(p == o or p.startswith(o + ".") for o in owned)}
        if not found:
            raise PassError(f"{type(model).__name__} has no cross-attention (an attention module with a separate "
                            "context) to add image keys and values to", self.name)
        chosen = list(select(self.targets, found, what="image adapter target") if self.targets else found)
        widths = {context_width(model.get_submodule(p)) for p in chosen}
        if len(widths) != 1:
            raise RecipeError(f"{self.name}: the chosen cross-attentions read contexts of different widths "
                              f"{sorted(widths)}; choose attentions of one width with targets=")
        width = widths.pop()
        generator = torch.Generator().manual_seed(self.seed)
        device = next(model.parameters()).device
        for path in chosen:
            replace_submodule(model, path, ImageCrossAttention(model.get_submodule(path), width, generator).to(device))
        adapted = ImageAdapted(model, self.features, self.tokens, width, self.input_name, self.scale,
                               self.image_channels).to(device)
        gen = torch.Generator().manual_seed(self.seed + 1)

        def with_image(inputs: Inputs) -> Inputs:
            batch = inputs.batch_size or 1
            shape = (batch, self.features) if self.image_channels is None else (
                batch, self.image_channels, self.image_size, self.image_size)
            return Inputs(inputs.args, {**inputs.kwargs, self.input_name: torch.randn(shape, generator=gen).to(device)})

        graph.example = with_image(graph.example)
        graph.calibration = [with_image(c) for c in graph.calibration]
        wrapped = [model.get_submodule(t) for t in chosen]
        params = sum(p.numel() for n, p in adapted.named_parameters() if n.startswith("image_")) + sum(
            m.to_k_ip.weight.numel() + m.to_v_ip.weight.numel() for m in wrapped)
        for entry in entries.values():  # branches added before move inside the adapted model
            remap_paths(entry, lambda p: adapted_path(p, chosen) if p else "model")
        owned = ["image_projector", *(["image_encoder"] if self.image_channels else [])]
        registry(graph)[self.branch] = {
            "kind": "image_adapter", "role": self.role, "scale": self.scale, "input": self.input_name,
            "features": self.features, "tokens": self.tokens, "width": width, "targets": chosen,
            "image_channels": self.image_channels,
            "modules": [*owned, *[f"model.{t}.{part}" for t in chosen for part in ("to_k_ip", "to_v_ip")]],
            "wrappers": [f"model.{t}" for t in chosen], "scale_modules": [""], "params": params,
        }
        new = recaptured(graph, adapted, {p: adapted_path(p, chosen) for p in graph.layers})
        return PassResult(new, True, {"branch": self.branch, "attentions": len(chosen), "width": width,
                                      "params": params, "input": self.input_name})
