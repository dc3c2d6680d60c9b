"""Typed, versioned, JSON-serialisable annotations kept in ``node.meta["fxpress"]``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ANNOTATION_VERSION = 1
GRIDS = ("balanced", "plain")


@dataclass(frozen=True)
class QuantSpec:
    """How one layer's weight is quantized: width, grid, scale layout and scale initialisation.

    A "balanced" b-bit grid has the 2^b+1 integer levels -2^(b-1)..2^(b-1) (1 bit: {-1, 0, 1});
    a "plain" grid has the 2^b levels -2^(b-1)..2^(b-1)-1 of a two's-complement integer.
    """

    bits: int
    grid: Literal["balanced", "plain"] = "balanced"
    scale_init: Literal["als", "minmax"] = "als"
    scale_layout: Literal["per_channel"] = "per_channel"
    scale_dtype: Literal["float16", "float32"] = "float16"
    version: int = ANNOTATION_VERSION

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bit width must be in 1..8, got {self.bits}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - (self.grid == "plain")

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    @property
    def cost_bits(self) -> float:
        """Bits per weight as the paper counts them: log2(levels)."""
        return math.log2(self.levels)

    @property
    def key(self) -> str:
        """Short name such as 'b2' (balanced 2-bit) or 'p4' (plain 4-bit)."""
        return f"{self.grid[0]}{self.bits}"

    @staticmethod
    def from_key(key: str, **kwargs: Any) -> QuantSpec:
        """Parse a key made by `key`."""
        grid = {"b": "balanced", "p": "plain"}[key[0]]
        return QuantSpec(bits=int(key[1:]), grid=grid, **kwargs)


@dataclass
class Sensitivity:
    """Error caused by quantizing this layer alone, per option key (e.g. 'b2')."""

    mode: Literal["local", "hybrid", "e2e"]
    error: dict[str, float] = field(default_factory=dict)
    psnr: dict[str, float] = field(default_factory=dict)
    version: int = ANNOTATION_VERSION


BRANCH_KINDS = ("lora", "image_adapter", "control")
BRANCH_ROLES = ("adapter", "train_only")


@dataclass
class BranchSpec:
    """A branch added beside the model: its name and kind, whether inference keeps it ("adapter") or it
    exists only while training ("train_only", removed by StripBranches), and its output scale."""

    name: str
    kind: Literal["lora", "image_adapter", "control"]
    role: Literal["adapter", "train_only"] = "adapter"
    scale: float = 1.0
    version: int = ANNOTATION_VERSION

    def __post_init__(self) -> None:
        if self.kind not in BRANCH_KINDS:
            raise ValueError(f"branch kind must be one of {BRANCH_KINDS}, got {self.kind!r}")
        if self.role not in BRANCH_ROLES:
            raise ValueError(f"branch role must be one of {BRANCH_ROLES}, got {self.role!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"branch scale must be finite, got {self.scale}")


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


@dataclass
class LayerAnnotation:
    """Everything passes have recorded about one weight-bearing layer."""

    quant: QuantSpec | None = None
    keep_reason: str | None = None
    sensitivity: dict[str, Sensitivity] = field(default_factory=dict)
    code_entropy: dict[str, float] = field(default_factory=dict)
    weight_error: float | None = None
    branch: BranchSpec | None = None  # set on the layers of an inserted branch
    version: int = ANNOTATION_VERSION

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (measurements rounded to 4 significant digits)."""
        return _rounded(asdict(self))

    @staticmethod
    def from_json(data: dict[str, Any]) -> LayerAnnotation:
        """Rebuild from `to_json` output; raises ValueError on a newer version."""
        if data.get("version", 0) > ANNOTATION_VERSION:
            raise ValueError(f"annotation version {data['version']} is newer than {ANNOTATION_VERSION}")
        quant = QuantSpec(**data["quant"]) if data.get("quant") else None
        sens = {k: Sensitivity(**v) for k, v in data.get("sensitivity", {}).items()}
        branch = BranchSpec(**data["branch"]) if data.get("branch") else None
        return LayerAnnotation(quant=quant, keep_reason=data.get("keep_reason"), sensitivity=sens,
                               code_entropy=data.get("code_entropy", {}), weight_error=data.get("weight_error"),
                               branch=branch)
