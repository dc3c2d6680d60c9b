"""`ControlledUNet`: a UNet with a ControlNet-style control branch beside it.

The branch is a trainable copy of the UNet's encoder half (input conv, time embedding, down blocks, mid
block) fed the control map through a small conditioning stem, as diffusers' `ControlNetModel` builds
it; its per-resolution outputs pass zero-initialised 1x1 convs and enter the UNet as the residuals
its forward takes (`down_block_additional_residuals`, `mid_block_additional_residual`). Zero convs
mean a new branch leaves the output unchanged; `scale` (a buffer, settable without capturing again)
multiplies the residuals, and at 0 the output equals the plain UNet's exactly.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

from fxpress.errors import ModelError

RESIDUAL_INPUTS = ("down_block_additional_residuals", "mid_block_additional_residual")


def takes_control_residuals(unet: nn.Module) -> bool:
    """Whether `unet.forward` takes the residual inputs a control branch feeds (diffusers' UNet2DConditionModel)."""
    params = inspect.signature(unet.forward).parameters
    return all(name in params for name in RESIDUAL_INPUTS)


def build_controlnet(unet: nn.Module, channels: int, embedding_channels: tuple[int, ...],
                     copy_weights: bool = True) -> nn.Module:
    """A diffusers ControlNetModel made from `unet`'s config (its encoder weights copied when `copy_weights`)."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(embedding_channels),
                                     load_weights_from_unet=copy_weights, conditioning_channels=channels)


def control_shape(controlnet: nn.Module, sample_shape: torch.Size) -> tuple[int, ...]:
    """The control map shape `controlnet` takes beside a sample of `sample_shape` (N, C, H, W)."""
    cfg = controlnet.config
    scale = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
    n, _, h, w = sample_shape
    return (n, cfg.conditioning_channels, h * scale, w * scale)


class ControlledUNet(nn.Module):
    """`unet` plus a control branch (see the module docstring); the control map is the keyword `input_name`."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module, input_name: str = "control", scale: float = 1.0):
        super().__init__()
        self.unet, self.controlnet, self.input_name = unet, controlnet, input_name
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.config = getattr(unet, "config", None)  # pipelines and samplers read the UNet's config

    @property
    def wrapped(self) -> nn.Module:
        """The UNet inside (what an artifact's source describes)."""
        return self.unet

    def _check(self, sample: torch.Tensor, control: torch.Tensor) -> None:
        expected = control_shape(self.controlnet, sample.shape)
        if tuple(control.shape) != expected:
            raise ModelError(f"control input {self.input_name!r} has shape {tuple(control.shape)}; with a sample "
                             f"of shape {tuple(sample.shape)} the control branch takes {expected}")

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *args: Any, **kwargs: Any) -> Any:
        control = kwargs.pop(self.input_name, None)
        if control is None:
            return self.unet(sample, timestep, encoder_hidden_states, *args, **kwargs)
        self._check(sample, control)
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond=control,
                                    return_dict=False)
        down = [r * self.scale.to(r.dtype) for r in down]
        return self.unet(sample, timestep, encoder_hidden_states, *args, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid * self.scale.to(mid.dtype), **kwargs)


def block_list(model: nn.Module) -> str | None:
    """The name of the model's transformer-block list: its largest top-level ModuleList of one module type."""
    lists = [(len(child), name) for name, child in model.named_children()
             if isinstance(child, nn.ModuleList) and len(child) and len({type(m) for m in child}) == 1]
    return max(lists)[1] if lists else None


class ControlledBlock(nn.Module):
    """One of the first k blocks of a controlled transformer: the base block, its trainable copy run on the
    control stream, and a zero-initialised projection adding the copy's output to the base's."""

    def __init__(self, block: nn.Module, width: int):
        super().__init__()
        self.block = block
        self.control_block = copy.deepcopy(block)
        self.zero_out = nn.Linear(width, width)
        nn.init.zeros_(self.zero_out.weight)
        nn.init.zeros_(self.zero_out.bias)
        self.stream: dict[str, Any] | None = None  # set by ControlledTransformer for the length of one call

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # models read their blocks' parts (DiT: transformer_blocks[0].norm1)
            return getattr(super().__getattr__("block"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.block(hidden_states, *args, **kwargs)
        if self.stream is None:
            return out
        control = self.stream.get("tokens")
        if control is None:  # the first controlled block starts the stream from its own input
            control = hidden_states + self.stream.pop("embedded")
        control = self.control_block(control, *args, **kwargs)
        self.stream["tokens"] = control
        return out + self.zero_out(control) * self.stream["scale"].to(out.dtype)


class ControlledTransformer(nn.Module):
    """A transformer (DiT) with a control branch: the control map (shaped like the sample) goes through a
    trainable copy of the model's patch embedding and a zero-initialised projection into the token stream
    of the first k blocks' trainable copies; each copy's output is added to its base block's through a
    zero-initialised projection. Zero projections leave the output unchanged; `scale` multiplies the
    branch, and at 0 the output equals the plain model's exactly."""

    def __init__(self, model: nn.Module, blocks: str, count: int, embed_path: str, width: int,
                 input_name: str = "control", scale: float = 1.0, sample_input: str = "hidden_states"):
        super().__init__()
        self.model, self.blocks, self.count, self.input_name = model, blocks, int(count), input_name
        self.sample_input = sample_input
        self.control_embed = copy.deepcopy(model.get_submodule(embed_path))
        self.zero_in = nn.Linear(width, width)
        nn.init.zeros_(self.zero_in.weight)
        nn.init.zeros_(self.zero_in.bias)
        block_list_ = model.get_submodule(blocks)
        for i in range(self.count):
            if not isinstance(block_list_[i], ControlledBlock):
                block_list_[i] = ControlledBlock(block_list_[i], width)
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.config = getattr(model, "config", None)

    @property
    def wrapped(self) -> nn.Module:
        """The transformer inside (what an artifact's source describes)."""
        return self.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        control = kwargs.pop(self.input_name, None)
        if control is None:
            return self.model(*args, **kwargs)
        sample = args[0] if args else kwargs[self.sample_input]
        if tuple(control.shape) != tuple(sample.shape):
            raise ModelError(f"control input {self.input_name!r} has shape {tuple(control.shape)}; the control "
                             f"branch of a transformer takes the sample's shape {tuple(sample.shape)}")
        stream = {"embedded": self.zero_in(self.control_embed(control)), "scale": self.scale}
        controlled = [b for b in self.model.get_submodule(self.blocks)[: self.count]]
        for block in controlled:
            block.stream = stream
        try:
            return self.model(*args, **kwargs)
        finally:
            for block in controlled:
                block.stream = None
