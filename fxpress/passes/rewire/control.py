"""`AttachControlBranch`: a ControlNet-style trainable copy of a UNet's encoder, fed a control map, injected
through zero-initialised layers into the skip connections (see `kernels.control`)."""

from __future__ import annotations

import torch
from torch import nn

from fxpress.errors import PassError, RecipeError
from fxpress.ir.graph import Graph, Inputs
from fxpress.kernels.control import ControlledUNet, build_controlnet, takes_control_residuals
from fxpress.passes.base import Pass, PassResult
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
    """Wrap the graph's UNet in a `ControlledUNet` whose branch is initialised from the UNet's encoder (or
    from `controlnet`, a diffusers ControlNetModel of the same config); the graph gains the input `input_name`
    (N, channels, H·2^(k-1), W·2^(k-1)) for k = len(embedding_channels)."""

    provides = ("branches",)
    transforms = True

    def __init__(self, name: str = "control", input_name: str = "control", channels: int = 3,
                 embedding_channels: tuple[int, ...] = (16, 32, 96, 256), role: str = "adapter",
                 scale: float = 1.0, controlnet: nn.Module | None = None):
        if role not in ("adapter", "train_only"):
            raise RecipeError(f"AttachControlBranch: role must be 'adapter' or 'train_only', got {role!r}")
        if not isinstance(channels, int) or channels < 1 or not embedding_channels:
            raise RecipeError("AttachControlBranch: channels must be a positive integer and embedding_channels "
                              "a non-empty list")
        self.branch, self.input_name, self.channels = name, input_name, channels
        self.embedding_channels, self.role, self.scale = tuple(embedding_channels), role, float(scale)
        self.controlnet = controlnet
        if controlnet is not None:
            cfg = controlnet.config
            self.channels = cfg.conditioning_channels
            self.embedding_channels = tuple(cfg.conditioning_embedding_out_channels)

    def run(self, graph: Graph) -> PassResult:
        check_new_name(graph, self.branch, self.name)
        unet = graph.module
        if not takes_control_residuals(unet):
            raise PassError(f"{type(unet).__name__}.forward takes no control residuals "
                            "(down_block_additional_residuals, mid_block_additional_residual); control branches "
                            "attach to diffusers-style UNets", self.name)
        if self.input_name in graph.input_names or self.input_name in graph.example.kwargs:
            raise RecipeError(f"{self.name}: the model already has an input named {self.input_name!r}")
        if registry(graph):
            raise RecipeError(f"{self.name}: attach the control branch before other branches (the model has "
                              f"{', '.join(registry(graph))})")
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
