"""`ControlledUNet`: a UNet with a ControlNet-style control branch beside it.

The branch is a trainable copy of the UNet's encoder half (input conv, time embedding, down blocks, mid
block) fed the control map through a small conditioning stem, as diffusers' `ControlNetModel` builds
it; its per-resolution outputs pass zero-initialised 1x1 convs and enter the UNet as the residuals
its forward takes (`down_block_additional_residuals`, `mid_block_additional_residual`). Zero convs
mean a new branch leaves the output unchanged; `scale` (a buffer, settable without capturing again)
multiplies the residuals, and at 0 the output equals the plain UNet's exactly.
"""

from __future__ import annotations

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
