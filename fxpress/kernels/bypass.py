"""`Bypass`: stands in for a pruned residual block, returning the block's stream input unchanged."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class StreamArg:
    """Where a block's stream input sits in its call: a position or a keyword, and how it returns."""

    position: int | None
    keyword: str | None
    returns_tuple: bool

    def pick(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """Return the stream tensor from a call's arguments."""
        return args[self.position] if self.position is not None else kwargs[self.keyword]

    def result(self, stream: torch.Tensor) -> Any:
        """Return what the block would return if it added nothing to its stream."""
        return (stream,) if self.returns_tuple else stream

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (for artifacts)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamArg:
        """Inverse of to_json."""
        return cls(data.get("position"), data.get("keyword"), bool(data.get("returns_tuple")))


class Bypass(nn.Module):
    """Stands in for a removed block: returns the block's stream input."""

    def __init__(self, stream: StreamArg, removed: str):
        super().__init__()
        self.stream, self.removed = stream, removed

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.stream.result(self.stream.pick(args, kwargs))

    def extra_repr(self) -> str:
        return f"removed={self.removed}"
