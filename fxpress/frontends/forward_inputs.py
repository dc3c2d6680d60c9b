"""Example inputs for a diffusers or transformers model, derived from its forward signature and config.

Each known parameter name (`sample`, `hidden_states`, `timestep`, `encoder_hidden_states`, `input_ids`, ...)
is filled from the config sizes it needs (`in_channels` and `sample_size`, `cross_attention_dim`,
`vocab_size`, ...). A parameter the config gives no size for is left at its default; a required
parameter nothing here can fill is an error that names it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fxpress.errors import ModelSourceError
from fxpress.frontends.zoo import ExampleInputs

BATCH = 2  # torch.export specialises a batch of 1; 2 keeps the batch dimension general
TEXT_TOKENS = 77  # text length when the config sets no shorter limit (CLIP's context)
MID_TIMESTEP = 500
TRAIN_TIMESTEPS = 1000
VAE_FACTOR = 8  # latent pixels to image pixels, for size conditions given in image pixels
MASKS = ("attention_mask", "encoder_attention_mask")  # filled only when the forward requires them

Config = Mapping[str, Any]
Filler = Callable[[Config, torch.Generator, "float | None"], Any]


def _int(config: Config, key: str) -> int | None:
    value = config.get(key)
    if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
        value = value[0]  # a per-block size that is the same for every block
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _spatial(config: Config) -> tuple[int, int] | None:
    size = config.get("sample_size")
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    return None


def _text_length(config: Config) -> int:
    limit = _int(config, "max_position_embeddings") or _int(config, "n_positions")
    return min(TEXT_TOKENS, limit) if limit else TEXT_TOKENS


def _latents(config: Config, gen: torch.Generator, fraction: float | None) -> torch.Tensor | None:
    channels, size = _int(config, "in_channels"), _spatial(config)
    if channels is None or size is None:
        return None
    return torch.randn(BATCH, channels, *size, generator=gen)


def _timestep(config: Config, gen: torch.Generator, fraction: float | None) -> torch.Tensor:
    t = MID_TIMESTEP if fraction is None else min(TRAIN_TIMESTEPS - 1, int(fraction * TRAIN_TIMESTEPS))
    return torch.full((BATCH,), t, dtype=torch.long)


def _text_states(config: Config, gen: torch.Generator, fraction: float | None) -> torch.Tensor | None:
    if config.get("encoder_hid_dim_type") not in (None, "text_proj"):
        raise ModelSourceError(f"encoder_hid_dim_type {config['encoder_hid_dim_type']!r} needs image embeddings")
    # the width of the text states the model reads: a projected UNet input, PixArt captions, SD3 joint
    # attention, then plain cross-attention
    for key in ("encoder_hid_dim", "caption_channels", "joint_attention_dim", "cross_attention_dim"):
        if dim := _int(config, key):
            return torch.randn(BATCH, TEXT_TOKENS, dim, generator=gen)
    return None


def _pooled(config: Config, gen: torch.Generator, fraction: float | None) -> torch.Tensor | None:
    dim = _int(config, "pooled_projection_dim")
    return None if dim is None else torch.randn(BATCH, dim, generator=gen)


def _class_labels(config: Config, gen: torch.Generator, fraction: float | None) -> torch.Tensor | None:
    kind = config.get("class_embed_type")
    if kind == "timestep":
        return _timestep(config, gen, fraction)
    if kind in ("projection", "simple_projection") and (dim := _int(config, "projection_class_embeddings_input_dim")):
        return torch.randn(BATCH, dim, generator=gen)
    if kind is not None:
        raise ModelSourceError(f"class_embed_type {kind!r} takes class_labels this cannot derive")
    classes = _int(config, "num_class_embeds")
    if classes is None and config.get("norm_type") == "ada_norm_zero":
        classes = _int(config, "num_embeds_ada_norm")  # DiT: class-conditional adaptive norm
    return None if classes is None else torch.randint(0, classes, (BATCH,), generator=gen)


def _added_conditions(config: Config, gen: torch.Generator, fraction: float | None) -> dict | None:
    kind = config.get("addition_embed_type")
    size = _spatial(config) or (0, 0)
    pixels = [s * VAE_FACTOR for s in size]
    if kind == "text_time":  # SDXL: pooled text embeds + 6 size/crop ids, each Fourier-embedded
        time_dim, total = _int(config, "addition_time_embed_dim"), _int(config, "projection_class_embeddings_input_dim")
        if not time_dim or not total or total <= 6 * time_dim:
            raise ModelSourceError("addition_embed_type 'text_time' needs addition_time_embed_dim and "
                                   "projection_class_embeddings_input_dim")
        ids = torch.tensor([[*pixels, 0, 0, *pixels]], dtype=torch.float32).repeat(BATCH, 1)
        return {"text_embeds": torch.randn(BATCH, total - 6 * time_dim, generator=gen), "time_ids": ids}
    if kind not in (None, "text"):
        raise ModelSourceError(f"addition_embed_type {kind!r} takes image conditions this cannot derive")
    if "use_additional_conditions" in config:  # PixArt: image resolution and aspect ratio (ignored when off)
        return {"resolution": torch.tensor([pixels], dtype=torch.float32).repeat(BATCH, 1),
                "aspect_ratio": torch.ones(BATCH, 1)}
    return None


def _token_ids(config: Config, gen: torch.Generator, fraction: float | None) -> torch.Tensor | None:
    vocab = _int(config, "vocab_size")
    return None if vocab is None else torch.randint(0, vocab, (BATCH, _text_length(config)), generator=gen)


def _decoder_ids(config: Config, gen: torch.Generator, fraction: float | None) -> torch.Tensor | None:
    return _token_ids(config, gen, fraction) if config.get("is_encoder_decoder") else None


def _pixels(config: Config, gen: torch.Generator, fraction: float | None) -> torch.Tensor | None:
    channels, size = _int(config, "num_channels"), _int(config, "image_size")
    return None if not channels or not size else torch.randn(BATCH, channels, size, size, generator=gen)


def _mask(config: Config, gen: torch.Generator, fraction: float | None) -> torch.Tensor:
    return torch.ones(BATCH, _text_length(config), dtype=torch.long)


FILLERS: dict[str, Filler] = {
    "sample": _latents, "hidden_states": _latents, "timestep": _timestep,
    "encoder_hidden_states": _text_states, "pooled_projections": _pooled, "class_labels": _class_labels,
    "added_cond_kwargs": _added_conditions, "input_ids": _token_ids, "decoder_input_ids": _decoder_ids,
    "pixel_values": _pixels, "attention_mask": _mask, "encoder_attention_mask": _mask,
}


def forward_parameters(forward: Callable) -> dict[str, bool]:
    """Return {name: required} for the named parameters of `forward` (self, *args, **kwargs left out)."""
    params = inspect.signature(forward).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default is inspect.Parameter.empty for p in params if p.kind in kinds and p.name != "self"}


def inputs_maker(forward: Callable, config: Config, where: str,
                 hint: str = "write a package.module:factory returning (model, example_inputs)"
                 ) -> Callable[[torch.Generator, float | None], ExampleInputs]:
    """Return make(generator, timestep_fraction) -> ExampleInputs (batch 2) for a model with this forward and config.

    Checked once here: raises ModelSourceError naming the argument when a required one cannot be filled
    (or nothing at all can), saying what the config lacks and suggesting `hint`.
    """
    params = forward_parameters(forward)

    def make(gen: torch.Generator, fraction: float | None) -> ExampleInputs:
        kwargs: dict[str, Any] = {}
        for name, required in params.items():
            filler = FILLERS.get(name)
            if filler is None or (name in MASKS and not required):
                value = None
            else:
                try:
                    value = filler(config, gen, fraction)
                except ModelSourceError as exc:
                    raise ModelSourceError(f"{where}: cannot derive argument {name!r}: {exc}; {hint}") from None
            if value is not None:
                kwargs[name] = value
            elif required:
                why = "no rule for this argument" if filler is None else "the config lacks the sizes it needs"
                raise ModelSourceError(f"{where}: cannot derive the required forward argument {name!r} ({why}); "
                                       f"{hint}")
        if not any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            raise ModelSourceError(f"{where}: no example input could be derived from forward({', '.join(params)}) "
                                   f"and the config; {hint}")
        return ExampleInputs(kwargs=kwargs)

    make(torch.Generator().manual_seed(0), None)
    return make
