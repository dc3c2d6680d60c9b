"""Prompts for training on generated images: token ids, the unconditional prompt and what each prompt asks for,
and `encode_ids`, the text encoder call every reward-tuning piece shares."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fxpress.errors import RecipeError
from fxpress.ir.graph import output_tensors


@dataclass
class PromptSet:
    """Training prompts as token ids (N, L), what each asks for ({factor: (N,) class, −1 where unsaid})
    and the unconditional prompt's ids (1, L)."""

    input_ids: torch.Tensor
    unconditional: torch.Tensor
    targets: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.unconditional.dim() != 2 or self.unconditional.shape[0] != 1 \
                or self.unconditional.shape[1] != self.input_ids.shape[1]:
            raise RecipeError(f"prompts: need ids (N, L) and unconditional ids (1, L), got "
                              f"{tuple(self.input_ids.shape)} and {tuple(self.unconditional.shape)}")
        bad = [k for k, v in self.targets.items() if v.shape != (self.input_ids.shape[0],)]
        if bad:
            raise RecipeError(f"prompts: targets {bad} need one value per prompt ({self.input_ids.shape[0]})")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def draw(self, generator: torch.Generator, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return `size` prompts drawn with replacement: (ids, targets)."""
        index = torch.randint(0, len(self), (size,), generator=generator)
        return self.input_ids[index], {k: v[index] for k, v in self.targets.items()}


def encode_ids(encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Return a text encoder's hidden states (N, L, width) for token ids: its first output tensor (a
    transformers model's last_hidden_state, or a compressed graph's first output)."""
    return output_tensors(encoder(ids))[0]
