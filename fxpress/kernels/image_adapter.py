"""Decoupled image cross-attention (IP-Adapter style): image tokens get their own keys and values beside
each cross-attention's text keys and values, and the two attention results are summed with a scale.

`ImageAdapted` wraps the model. It takes image features (N, features), or with `image_channels` a
reference image (N, C, H, W) that a small trainable conv encoder turns into features, as a new keyword
input, and makes them into `tokens` tokens of the cross-attention width with a small trainable
projector (linear + LayerNorm). During the call it hands them to every `ImageCrossAttention`, which wraps one
cross-attention module. Each computes attn(x, text) + scale · W_out · softmax(q kᵢᵀ) vᵢ, with W_out the
attention's own output projection (bias once), q its own query, and kᵢ, vᵢ new projections of the image
tokens. vᵢ starts at zero, so the output is unchanged until the adapter trains. `scale` is a buffer
(settable without capturing again); at 0 the output equals the plain model's exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxpress.errors import ModelError


def is_cross_attention(module: nn.Module) -> bool:
    """Whether `module` is a diffusers-style attention over a separate context (to_q/to_k/to_v/to_out, heads)."""
    return bool(getattr(module, "is_cross_attention", False)) and all(
        hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads"))


def projection_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) features of a linear projection: plain, low-bit, or wrapped by a LoRA (its base layer)."""
    layer = getattr(layer, "base_layer", layer)
    if hasattr(layer, "out_features") and hasattr(layer, "in_features"):
        return int(layer.out_features), int(layer.in_features)
    return int(layer.weight.shape[0]), int(layer.weight.shape[1])


class ImageCrossAttention(nn.Module):
    """One cross-attention plus image keys and values (see the module docstring)."""

    def __init__(self, attn: nn.Module, width: int, generator: torch.Generator | None = None):
        super().__init__()
        inner = projection_shape(attn.to_k)[0]
        self.attn = attn
        self.to_k_ip = nn.Linear(width, inner, bias=False)
        self.to_v_ip = nn.Linear(width, inner, bias=False)
        with torch.no_grad():
            bound = 1.0 / width ** 0.5
            self.to_k_ip.weight.uniform_(-bound, bound, generator=generator)
            self.to_v_ip.weight.zero_()
        self.tokens: torch.Tensor | None = None   # set by ImageAdapted for the length of one call
        self.ip_scale: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.attn(hidden_states, encoder_hidden_states, *args, **kwargs)
        if self.tokens is None:
            return out
        if hidden_states.dim() != 3:
            raise ModelError(f"image cross-attention takes (batch, tokens, width) hidden states, got "
                             f"{tuple(hidden_states.shape)}")
        attn, heads = self.attn, self.attn.heads
        batch = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        k, v = self.to_k_ip(self.tokens.to(q.dtype)), self.to_v_ip(self.tokens.to(q.dtype))
        split = [t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v)]
        if getattr(attn, "norm_q", None) is not None:
            split[0] = attn.norm_q(split[0])
        if getattr(attn, "norm_k", None) is not None:
            split[1] = attn.norm_k(split[1])
        image = F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(batch, -1, q.shape[-1])
        projected = attn.to_out[0](image)
        if getattr(attn.to_out[0], "bias", None) is not None:
            projected = projected - attn.to_out[0].bias
        return out + projected * (self.ip_scale.to(out.dtype) / getattr(attn, "rescale_output_factor", 1.0))


class ImageAdapted(nn.Module):
    """A model whose cross-attentions (the `ImageCrossAttention` modules inside it) also attend to image
    tokens made from the keyword input `input_name` (see the module docstring)."""

    def __init__(self, model: nn.Module, features: int, tokens: int, width: int, input_name: str = "image_embeds",
                 scale: float = 1.0, image_channels: int | None = None):
        super().__init__()
        self.model, self.input_name, self.tokens, self.width = model, input_name, int(tokens), int(width)
        self.image_channels = image_channels
        self.image_encoder = None if image_channels is None else nn.Sequential(
            nn.Conv2d(image_channels, 32, 3, 2, 1), nn.SiLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(64, features, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.image_projector = nn.Sequential(nn.Linear(features, tokens * width), nn.LayerNorm(width))
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.config = getattr(model, "config", None)

    @property
    def wrapped(self) -> nn.Module:
        """The model inside (what an artifact's source describes)."""
        return self.model

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(N, features) image features, or (N, C, H, W) images with an encoder → (N, tokens, width) tokens."""
        if self.image_encoder is not None:
            if features.dim() != 4 or features.shape[1] != self.image_channels:
                raise ModelError(f"image input {self.input_name!r} must be (batch, {self.image_channels}, height, "
                                 f"width) images, got {tuple(features.shape)}")
            features = self.image_encoder(features)
        linear, norm = self.image_projector
        if features.dim() != 2 or features.shape[1] != linear.in_features:
            raise ModelError(f"image input {self.input_name!r} must be (batch, {linear.in_features}) image "
                             f"features, got {tuple(features.shape)}")
        return norm(linear(features).view(features.shape[0], self.tokens, self.width))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        features = kwargs.pop(self.input_name, None)
        if features is None:
            return self.model(*args, **kwargs)
        tokens = self.project(features)
        adapters = [m for m in self.model.modules() if isinstance(m, ImageCrossAttention)]
        for m in adapters:
            m.tokens, m.ip_scale = tokens, self.scale
        try:
            return self.model(*args, **kwargs)
        finally:
            for m in adapters:
                m.tokens = m.ip_scale = None
