"""The built-in model zoo: real diffusers/transformers classes built from configs, seeded weights."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxpress.errors import RecipeError

SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [64, 128],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

DIT_S_CONFIG: dict[str, Any] = {
    "num_attention_heads": 6,
    "attention_head_dim": 64,
    "in_channels": 4,
    "num_layers": 12,
    "sample_size": 32,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,
}

SD15_CLIP_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}


@dataclass
class ExampleInputs:
    """Positional and keyword arguments for one call of a model."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ZooEntry:
    """One zoo model: how to build it, its example inputs and calibration inputs."""

    name: str
    description: str
    build_fn: Callable[[], nn.Module]
    inputs_fn: Callable[[torch.Generator, float | None], ExampleInputs]
    timestep_key: str | None = None

    def build(self, seed: int = 0, weights: str = "trained-like") -> nn.Module:
        """Return the model with seeded weights ('trained-like' normal or 'default' torch init)."""
        torch.manual_seed(seed)
        model = self.build_fn().eval()
        if weights == "trained-like":
            init_trained_like(model, seed)
        elif weights != "default":
            raise RecipeError(f"unknown weight init {weights!r}; use 'trained-like' or 'default'")
        return model

    def example_inputs(self, seed: int = 0) -> ExampleInputs:
        """Return the example inputs used for capture (batch 2, a mid-range timestep)."""
        return self.inputs_fn(torch.Generator().manual_seed(seed), None)

    def calibration_inputs(self, count: int = 4, seed: int = 1) -> list[ExampleInputs]:
        """Return `count` inputs whose timesteps are spread evenly over the diffusion range."""
        gen = torch.Generator().manual_seed(seed)
        steps = [None] * count if self.timestep_key is None else [
            (i + 0.5) / count for i in range(count)
        ]
        return [self.inputs_fn(gen, fraction) for fraction in steps]


@dataclass
class TestbedEntry:
    """A trained testbed denoiser, UNet or DiT (fxpress.testbed): committed weights, real example and
    calibration inputs, and training data for quantization-aware training."""

    name: str
    description: str
    testbed: str
    timestep_key: str = "timestep"

    def _loaded(self):
        from fxpress.testbed.models import load_testbed

        cache = _TESTBEDS.get(self.testbed)
        if cache is None:
            cache = _TESTBEDS[self.testbed] = load_testbed(self.testbed)
        return cache

    def build(self, seed: int = 0, weights: str = "trained") -> nn.Module:
        """Return a fresh copy of the trained denoiser (`seed` and `weights` are ignored: the weights are trained)."""
        import copy

        return copy.deepcopy(self._loaded().denoiser).eval()

    def example_inputs(self, seed: int = 0) -> ExampleInputs:
        """Return two real training images noised to t=500 with their caption embeddings."""
        from fxpress.testbed.training_data import noisy_inputs

        return ExampleInputs(kwargs=noisy_inputs(self._loaded(), [500], seed)[0])

    def calibration_inputs(self, count: int = 4, seed: int = 1) -> list[ExampleInputs]:
        """Return `count` real noised inputs at timesteps spread evenly over the schedule."""
        from fxpress.testbed.training_data import noisy_inputs

        steps = [int((i + 0.5) * 1000 / count) for i in range(count)]
        return [ExampleInputs(kwargs=k) for k in noisy_inputs(self._loaded(), steps, seed)]

    def training_data(self):
        """Return the testbed's DiffusionData (training images and caption embeddings)."""
        from fxpress.testbed.training_data import diffusion_data

        return diffusion_data(self._loaded())


_TESTBEDS: dict[str, Any] = {}


def init_trained_like(model: nn.Module, seed: int) -> None:
    """Redraw linear/conv weights from a normal law with the default init's variance.

    Trained weights are bell-shaped, not uniform like PyTorch's default init, and a compressor's
    code statistics (and so its entropy-coded size) depend on that shape.
    """
    gen = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                fan_in = module.weight[0].numel()
                std = 1.0 / math.sqrt(3.0 * fan_in)  # variance of kaiming_uniform(a=sqrt(5))
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)


def _timestep(gen: torch.Generator, fraction: float | None, batch: int = 2) -> torch.Tensor:
    if fraction is None:
        return torch.full((batch,), 500, dtype=torch.long)
    return torch.full((batch,), min(999, int(fraction * 1000)), dtype=torch.long)


def _unet_inputs(config: dict[str, Any]) -> Callable[[torch.Generator, float | None], ExampleInputs]:
    def make(gen: torch.Generator, fraction: float | None) -> ExampleInputs:
        size, channels = config["sample_size"], config["in_channels"]
        return ExampleInputs(kwargs={
            "sample": torch.randn(2, channels, size, size, generator=gen),
            "timestep": _timestep(gen, fraction),
            "encoder_hidden_states": torch.randn(2, 77, config["cross_attention_dim"], generator=gen),
        })
    return make


def _dit_inputs(gen: torch.Generator, fraction: float | None) -> ExampleInputs:
    size = DIT_S_CONFIG["sample_size"]
    return ExampleInputs(kwargs={
        "hidden_states": torch.randn(2, DIT_S_CONFIG["in_channels"], size, size, generator=gen),
        "timestep": _timestep(gen, fraction),
        "class_labels": torch.randint(0, DIT_S_CONFIG["num_embeds_ada_norm"], (2,), generator=gen),
    })


def _clip_inputs(gen: torch.Generator, fraction: float | None) -> ExampleInputs:
    ids = torch.randint(0, SD15_CLIP_TEXT_CONFIG["vocab_size"], (2, 77), generator=gen)
    return ExampleInputs(kwargs={"input_ids": ids})


def _unet(config: dict[str, Any]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from diffusers import UNet2DConditionModel
        return UNet2DConditionModel(**config)
    return build


def _dit() -> nn.Module:
    from diffusers import DiTTransformer2DModel
    return DiTTransformer2DModel(**DIT_S_CONFIG)


def _clip_text() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**SD15_CLIP_TEXT_CONFIG))


ZOO: dict[str, ZooEntry | TestbedEntry] = {
    "sd15-unet": ZooEntry("sd15-unet", "diffusers UNet2DConditionModel, Stable Diffusion 1.5 config",
                          _unet(SD15_UNET_CONFIG), _unet_inputs(SD15_UNET_CONFIG), "timestep"),
    "tiny-unet": ZooEntry("tiny-unet", "diffusers UNet2DConditionModel, two levels, a few M params",
                          _unet(TINY_UNET_CONFIG), _unet_inputs(TINY_UNET_CONFIG), "timestep"),
    "dit-s": ZooEntry("dit-s", "diffusers DiTTransformer2DModel, DiT-S/2 on 32x32 latents",
                      _dit, _dit_inputs, "timestep"),
    "clip-text": ZooEntry("clip-text", "transformers CLIPTextModel, SD-1.5 text encoder config",
                          _clip_text, _clip_inputs, None),
    "testbed-digits-unet": TestbedEntry("testbed-digits-unet", "trained UNet2DConditionModel of the digits "
                                        "testbed (16x16, caption-conditioned through a small CLIPTextModel)",
                                        "digits"),
    "testbed-shapes-unet": TestbedEntry("testbed-shapes-unet", "trained UNet2DConditionModel of the captioned "
                                        "shapes testbed (32x32 RGB, shape/colour/size/position captions, "
                                        "v-prediction)", "shapes"),
    "testbed-digits-dit": TestbedEntry("testbed-digits-dit", "trained PixArtTransformer2DModel (DiT, 6 blocks, "
                                       "4 heads) of the digits testbed, caption-conditioned through a small "
                                       "CLIPTextModel", "digits-dit"),
}


def get(name: str) -> ZooEntry | TestbedEntry:
    """Return the zoo entry called `name`; raises RecipeError listing the known names."""
    if name not in ZOO:
        raise RecipeError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
    return ZOO[name]
