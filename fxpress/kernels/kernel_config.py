"""Tile configurations for the Triton kernels, and how each activation dtype reaches the tensor cores."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    """One tile shape and launch setting for the low-bit GEMM, conv or dequant kernels."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def to_json(self) -> dict:
        """Return the config as a plain dict (for the tuning cache)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> KernelConfig:
        """Rebuild a config written by to_json; unknown keys are an error."""
        return cls(**{k: int(v) for k, v in data.items()})


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """Return (upcast, input_precision) for tl.dot on activations of `dtype`.

    fp32 activations multiply in full fp32 ("ieee"), not TF32, so results match the torch reference.
    The interpreter computes bf16 tl.dot wrongly, so there bf16 tiles are upcast to fp32 first.
    """
    if dtype == torch.float32:
        return False, "ieee"
    return (dtype == torch.bfloat16 and interpreting()), "tf32"


def magic_fp16(dtype: torch.dtype, width: int, grouped: bool) -> bool:
    """True when weight tiles can be built as fp16 by bit tricks: fp16 activations, codes below 1024."""
    return dtype == torch.float16 and width <= 10 and not grouped
