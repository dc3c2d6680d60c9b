"""`AttachControlBranch`: a ControlNet-style trainable copy of a UNet's encoder, fed a control map, injected
through zero-initialised layers into the skip connections (see `kernels.control`)."""

from __future__ import annotations

import torch
from torch import nn

from fxpress.errors import PassError, RecipeError
from fxpress.ir.graph import Graph, Inputs
from fxpress.kernels.control import (
    ControlledTransformer,
    ControlledUNet,
    block_list,
    build_controlnet,
    takes_control_residuals,
)
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.quant.select_layers import resolve_keep
from fxpress.passes.rewire.branches import check_new_name, recaptured, registry


def control_example(inputs: Inputs, name: str, channels: int, downscale: int, sample_input: str = "sample") -> Inputs:
    """`inputs` plus a zero control map `name` at `downscale` times the sample's spatial size."""
    sample = inputs.kwargs.get(sample_input, inputs.args[0] if inputs.args else None)
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
        raise RecipeError(f"a control branch needs a 4-D (N, C, H, W) {sample_input!r} input to size its control map")
    n, _, h, w = sample.shape
    control = torch.zeros(n, channels, h * downscale, w * downscale, dtype=sample.dtype, device=sample.device)
    return Inputs(inputs.args, {**inputs.kwargs, name: control})


class AttachControlBranch(Pass):
    """Add a control branch and the input `input_name`.

    A UNet that takes control residuals becomes a `ControlledUNet` whose branch starts from the UNet's
    encoder (or from `controlnet`, a diffusers ControlNetModel of the same config); its control map is
    (N, channels, H·2^(k-1), W·2^(k-1)) for k = len(embedding_channels). Any other model with a list of
    transformer blocks becomes a `ControlledTransformer`: copies of its patch embedding and first
    `blocks` blocks (default: half), the control map shaped like the sample.
    """

    provides = ("branches",)
    transforms = True

    def __init__(self, name: str = "control", input_name: str = "control", channels: int = 3,
                 embedding_channels: tuple[int, ...] = (16, 32, 96, 256), role: str = "adapter",
                 scale: float = 1.0, controlnet: nn.Module | None = None, blocks: int | None = None):
        if role not in ("adapter", "train_only"):
            raise RecipeError(f"AttachControlBranch: role must be 'adapter' or 'train_only', got {role!r}")
        if not isinstance(channels, int) or channels < 1 or not embedding_channels:
            raise RecipeError("AttachControlBranch: channels must be a positive integer and embedding_channels "
                              "a non-empty list")
        self.branch, self.input_name, self.channels = name, input_name, channels
        self.embedding_channels, self.role, self.scale = tuple(embedding_channels), role, float(scale)
        self.controlnet, self.blocks = controlnet, blocks
        if controlnet is not None:
            cfg = controlnet.config
            self.channels = cfg.conditioning_channels
            self.embedding_channels = tuple(cfg.conditioning_embedding_out_channels)

    def run(self, graph: Graph) -> PassResult:
        check_new_name(graph, self.branch, self.name)
        unet = graph.module
        if self.input_name in graph.input_names or self.input_name in graph.example.kwargs:
            raise RecipeError(f"{self.name}: the model already has an input named {self.input_name!r}")
        if registry(graph):
            raise RecipeError(f"{self.name}: attach the control branch before other branches (the model has "
                              f"{', '.join(registry(graph))})")
        if not takes_control_residuals(unet):
            if self.controlnet is not None:
                raise RecipeError(f"{self.name}: a diffusers ControlNetModel feeds a UNet's residual inputs, which "
                                  f"{type(unet).__name__} does not take")
            return self._attach_to_blocks(graph)
        controlnet = self.controlnet
        if controlnet is None:
            try:
                controlnet = build_controlnet(unet, self.channels, self.embedding_channels)
            except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds for configs it cannot copy
                raise PassError(f"cannot build a control branch from {type(unet).__name__}: {exc}", self.name) from exc
        else:
            controlnet = type(controlnet).from_config(controlnet.config)
            controlnet.load_state_dict(self.controlnet.state_dict())
        controlnet = controlnet.to(next(unet.parameters()).device).eval()
        model = ControlledUNet(unet, controlnet, self.input_name, self.scale)
        downscale = 2 ** (len(self.embedding_channels) - 1)
        graph.example = control_example(graph.example, self.input_name, self.channels, downscale)
        graph.calibration = [control_example(c, self.input_name, self.channels, downscale) for c in graph.calibration]
        registry(graph)[self.branch] = {
            "kind": "control", "role": self.role, "scale": self.scale, "input": self.input_name,
            "channels": self.channels, "embedding_channels": list(self.embedding_channels),
            "modules": ["controlnet"], "scale_modules": [""],
            "params": sum(p.numel() for p in controlnet.parameters()),
        }
        new = recaptured(graph, model, {p: f"unet.{p}" for p in graph.layers})
        return PassResult(new, True, {"branch": self.branch, "input": self.input_name,
                                      "params": registry(new)[self.branch]["params"], "downscale": downscale})

    def _attach_to_blocks(self, graph: Graph) -> PassResult:
        model = graph.module
        blocks = block_list(model)
        if blocks is None:
            raise PassError(f"{type(model).__name__} takes no control residuals and has no list of transformer "
                            "blocks to copy: no place for a control branch", self.name)
        items = model.get_submodule(blocks)
        count = self.blocks if self.blocks is not None else (len(items) + 1) // 2
        if not isinstance(count, int) or not 1 <= count <= len(items):
            raise RecipeError(f"{self.name}: blocks must be in 1..{len(items)}, got {count!r}")
        first = next(iter(resolve_keep(graph, ["first"])), None)
        embed_path = first.rpartition(".")[0] if first else ""
        sample_input = graph.input_names[0]
        seen: dict[str, tuple[int, ...]] = {}

        def record(module, args, kwargs) -> None:
            hidden = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if hidden is not None:
                seen.setdefault("in", tuple(hidden.shape))

        handle = items[0].register_forward_pre_hook(record, with_kwargs=True)
        try:
            graph.run()
        finally:
            handle.remove()
        sample = graph.example.kwargs.get(sample_input, graph.example.args[0] if graph.example.args else None)
        try:
            with torch.no_grad():
                embedded = tuple(model.get_submodule(embed_path).eval()(sample).shape) if embed_path else None
        except Exception:  # noqa: BLE001 - any failure means the module is not a patch embedding
            embedded = None
        if embedded is None or embedded != seen.get("in"):
            raise PassError(f"cannot find {type(model).__name__}'s patch embedding: the module of its first layer "
                            f"({embed_path or 'none'}) does not make the first block's input {seen.get('in')}",
                            self.name)
        width = embedded[-1]
        wrapped = ControlledTransformer(model, blocks, count, embed_path, width, self.input_name, self.scale,
                                        sample_input)
        control = torch.zeros_like(sample)
        graph.example = Inputs(graph.example.args, {**graph.example.kwargs, self.input_name: control})
        graph.calibration = [Inputs(c.args, {**c.kwargs, self.input_name: torch.zeros_like(control)})
                             for c in graph.calibration]
        controlled = [f"model.{blocks}.{i}" for i in range(count)]
        params = sum(p.numel() for n, p in wrapped.named_parameters()
                     if n.startswith(("control_embed", "zero_in")) or ".control_block." in n or ".zero_out." in n)
        registry(graph)[self.branch] = {
            "kind": "control", "role": self.role, "scale": self.scale, "input": self.input_name,
            "channels": int(control.shape[1]), "embedding_channels": [], "blocks": blocks, "count": count,
            "embed": embed_path, "width": width, "sample_input": sample_input,
            "modules": ["control_embed", "zero_in", *[f"{c}.{part}" for c in controlled
                                                      for part in ("control_block", "zero_out")]],
            "wrappers": controlled, "scale_modules": [""], "params": params,
        }

        def renamed(path: str) -> str:
            for i in range(count):
                prefix = f"{blocks}.{i}"
                if path == prefix or path.startswith(prefix + "."):
                    return f"model.{prefix}.block{path[len(prefix):]}"
            return f"model.{path}"

        new = recaptured(graph, wrapped, {p: renamed(p) for p in graph.layers})
        return PassResult(new, True, {"branch": self.branch, "input": self.input_name, "params": params,
                                      "blocks": count, "embedding": embed_path})
