"""A word-level tokenizer for the testbed captions and the small CLIPTextModel that encodes them.

Ids: 0 pad, 1 start, 2 end, then the vocabulary in order. The empty caption (start, end, pads) is
the unconditional prompt of classifier-free guidance.
"""

from __future__ import annotations

import torch

from fxpress.errors import FxpressError

PAD, START, END = 0, 1, 2


class WordTokenizer:
    """Splits captions on spaces and maps each known word to an id; unknown words are an error."""

    def __init__(self, words: list[str], max_length: int):
        self.words = list(dict.fromkeys(words))
        self.ids = {w: i + 3 for i, w in enumerate(self.words)}
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 3

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """Return (N, max_length) token ids; raises FxpressError for an unknown word or a long caption."""
        rows = []
        for text in captions:
            words = text.split()
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise FxpressError(f"caption {text!r} has words outside the testbed vocabulary: {unknown}; "
                                   f"known: {' '.join(self.words)}")
            if len(words) + 2 > self.max_length:
                raise FxpressError(f"caption {text!r} is longer than {self.max_length - 2} words")
            ids = [START, *(self.ids[w] for w in words), END]
            rows.append(ids + [PAD] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


def text_encoder_config(vocab_size: int, max_length: int, width: int) -> dict:
    """Return the CLIPTextConfig fields of a two-layer text encoder of `width` channels."""
    return {"vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 2 * width,
            "projection_dim": width, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": max_length, "hidden_act": "quick_gelu",
            "pad_token_id": PAD, "bos_token_id": START, "eos_token_id": END}
