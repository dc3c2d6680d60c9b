"""The testbeds as data: dataset, vocabulary, denoiser kind and config, evaluation prompts, sampler settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fxpress.errors import FxpressError
from fxpress.testbed import digits, shapes
from fxpress.testbed.dataset import ImageSet
from fxpress.testbed.sampling import PREDICTIONS

SAMPLE_INPUTS = {"unet": "sample", "dit": "hidden_states"}  # denoiser kind -> keyword of the noisy sample


@dataclass(frozen=True)
class TestbedSpec:
    """Everything that defines one testbed; the trained weights live in `weights/<name>/`.

    `denoiser` is the architecture ("unet": diffusers UNet2DConditionModel; "dit": diffusers
    PixArtTransformer2DModel, a DiT with cross-attention to the text) and `model` its config;
    `prediction` is what it predicts: the noise ("epsilon") or the velocity ("v_prediction").
    `describe` writes a caption naming only some factors (None: unsaid); training then drops each
    factor from a caption with probability `train["factor_dropout"]`, so partial prompts work.
    `angles` are nuisance angle factors the classifier also reads (name -> period in degrees) and
    `angle_defined` says for which images each is defined (a circle has no rotation).
    """

    name: str
    load_split: Callable[[str], ImageSet]
    words: tuple[str, ...]
    max_length: int
    channels: int
    resolution: int
    factors: dict[str, int]
    prompts: Callable[[], list[tuple[str, dict[str, int]]]]
    denoiser: str = "unet"
    model: dict[str, Any] = field(default_factory=dict)
    text_width: int = 64
    guidance: float = 1.5
    sample_steps: int = 25
    prediction: str = "epsilon"
    train: dict[str, Any] = field(default_factory=dict)
    describe: Callable[[dict[str, int | None]], str] | None = None
    angles: dict[str, float] = field(default_factory=dict)
    angle_defined: Callable[[str, dict[str, torch.Tensor]], torch.Tensor] | None = None

    __test__ = False  # not a pytest class

    def __post_init__(self) -> None:
        if self.denoiser not in SAMPLE_INPUTS:
            raise FxpressError(f"testbed {self.name!r}: unknown denoiser {self.denoiser!r}; "
                               f"known: {', '.join(SAMPLE_INPUTS)}")
        if self.prediction not in PREDICTIONS:
            raise FxpressError(f"testbed {self.name!r}: unknown prediction {self.prediction!r}; "
                               f"known: {', '.join(PREDICTIONS)}")

    @property
    def sample_input(self) -> str:
        """The keyword the denoiser's forward takes the noisy sample by."""
        return SAMPLE_INPUTS[self.denoiser]


def _digit_prompts() -> list[tuple[str, dict[str, int]]]:
    return [(digits.caption(d), {"digit": d}) for d in range(10)]


def _shape_prompts() -> list[tuple[str, dict[str, int]]]:
    out = []
    for s in range(len(shapes.SHAPES)):
        for c in range(len(shapes.COLOURS)):
            size, position = (s + c) % 2, (s * 3 + c) % 4  # 24 prompts covering every value of every factor
            out.append((shapes.caption(s, c, size, position),
                        {"shape": s, "colour": c, "size": size, "position": position}))
    return out


def _unet(channels: int, resolution: int, widths: tuple[int, ...], groups: int, attention: int = 1) -> dict[str, Any]:
    """Return a UNet config with cross-attention in the `attention` lowest-resolution levels (and the mid block)."""
    plain = len(widths) - attention
    return {"sample_size": resolution, "in_channels": channels, "out_channels": channels,
            "down_block_types": ["DownBlock2D"] * plain + ["CrossAttnDownBlock2D"] * attention,
            "up_block_types": ["CrossAttnUpBlock2D"] * attention + ["UpBlock2D"] * plain,
            "block_out_channels": list(widths), "layers_per_block": 1, "cross_attention_dim": 64,
            "attention_head_dim": 8, "norm_num_groups": groups}


def _dit(channels: int, resolution: int, patch: int, width: int, heads: int, layers: int,
         text_width: int = 64) -> dict[str, Any]:
    """Return a PixArt-style DiT config: adaLN-single timestep conditioning, cross-attention to the text."""
    return {"sample_size": resolution, "patch_size": patch, "in_channels": channels, "out_channels": channels,
            "num_layers": layers, "num_attention_heads": heads, "attention_head_dim": width // heads,
            "cross_attention_dim": width, "caption_channels": text_width, "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False, "norm_eps": 1e-6, "use_additional_conditions": False,
            "num_embeds_ada_norm": 1000}


DIGITS = TestbedSpec(
    name="digits", load_split=digits.load_digits_split, words=("a", "handwritten", *digits.WORDS),
    max_length=6, channels=1, resolution=digits.SIZE, factors={"digit": 10}, prompts=_digit_prompts,
    model=_unet(1, digits.SIZE, (32, 64), 16),
    train={"steps": 4000, "batch": 64, "lr": 1e-3, "ema": 0.999, "caption_dropout": 0.1, "seed": 0,
           "classifier_steps": 1500},
)

SHAPES = TestbedSpec(
    name="shapes", load_split=shapes.load_shapes_split,
    words=("a", "at", "the", *shapes.SIZES, *shapes.COLOURS, *shapes.SHAPES, "top", "bottom", "left", "right",
           "shape"),
    max_length=10, channels=3, resolution=shapes.SIZE, factors=dict(shapes.FACTORS), prompts=_shape_prompts,
    model=_unet(3, shapes.SIZE, (32, 64, 64), 16),
    # Velocity, not noise: a noise predictor's x0 estimate at high noise multiplies its error by
    # 1/sqrt(alpha_bar) (about 12 at t=950), which set the flat background of a first, epsilon-trained
    # run to wrong, noisy colours (4% of samples right on every factor, although held-out noise MSE was low).
    prediction="v_prediction",
    describe=shapes.describe, angles={"rotation": shapes.ROTATION_PERIOD}, angle_defined=shapes.angle_defined,
    # factor_dropout: each factor is left out of a training caption with this probability, so partial
    # prompts ("a large shape", "a red shape at the top left") work, as an identity adapter's prompts need.
    # text_factor_loss: linear heads must read every named factor from the text encoder's states; without
    # it the jointly trained CLIP let the position words fade and the model ignored them (position 24%,
    # chance; benchmarks/results/shapes_position.md). classifier_lighting: the judge trains under random
    # global lighting, so it reads shapes under the identity-adapter task's lighting shift too.
    train={"steps": 4000, "batch": 64, "lr": 1e-3, "ema": 0.999, "caption_dropout": 0.1, "factor_dropout": 0.15,
           "text_factor_loss": 1.0, "seed": 0, "classifier_steps": 1500, "classifier_lighting": True},
)

DIGITS_DIT = TestbedSpec(
    name="digits-dit", load_split=digits.load_digits_split, words=DIGITS.words, max_length=DIGITS.max_length,
    channels=1, resolution=digits.SIZE, factors={"digit": 10}, prompts=_digit_prompts,
    denoiser="dit", model=_dit(1, digits.SIZE, patch=2, width=96, heads=4, layers=6),
    train={"steps": 4000, "batch": 64, "lr": 5e-4, "ema": 0.999, "caption_dropout": 0.1, "seed": 0,
           "classifier_steps": 1500},
)

TESTBEDS = {spec.name: spec for spec in (DIGITS, SHAPES, DIGITS_DIT)}


def get_spec(name: str) -> TestbedSpec:
    """Return the testbed called `name`; raises FxpressError listing the known ones."""
    if name not in TESTBEDS:
        raise FxpressError(f"unknown testbed {name!r}; known: {', '.join(TESTBEDS)}")
    return TESTBEDS[name]
