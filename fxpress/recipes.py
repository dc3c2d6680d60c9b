"""Recipes: validated dataclass configs (loadable from TOML) that expand to a list of passes."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from fxpress.errors import RecipeError
from fxpress.ir.annotations import GRIDS, QuantSpec
from fxpress.passes.base import Pass
from fxpress.passes.distill.adversarial import AdversarialDistill
from fxpress.passes.distill.config import DistillConfig
from fxpress.passes.distill.guidance import GuidanceDistill
from fxpress.passes.distill.progressive import ProgressiveDistill
from fxpress.passes.prune.schedule import PruneConfig
from fxpress.passes.prune.trilevel import TriLevelPrune
from fxpress.passes.quant.allocate_bits import AllocateBits
from fxpress.passes.quant.assign_uniform import AssignUniform
from fxpress.passes.quant.qat import FreezeQuantized, InsertFakeQuant, qat_passes
from fxpress.passes.quant.qat_config import QATConfig
from fxpress.passes.quant.quantize import QuantizeWeights, RoundToStorage
from fxpress.passes.quant.select_layers import SelectLayers
from fxpress.passes.quant.time_cache import CacheTimeEmbedding
from fxpress.passes.rewire.lora import InsertLoRA
from fxpress.passes.rewire.train import AdapterConfig, TrainBranches
from fxpress.passes.sensitivity import MeasureSensitivity

RECIPE_VERSION = 1


@dataclass(frozen=True)
class BitsFusionRecipe:
    """BitsFusion post-training quantization: time-embedding cache, sensitivity, mixed-precision allocation.

    Give `target_bits` (average log2(levels) over quantized weights) or `budget_bytes` (the whole artifact,
    costed at the stored size of `codec`: code entropy for 'rans', log2(levels) for fixed-rate 'radix').
    """

    name: ClassVar[str] = "bitsfusion"
    target_bits: float | None = 1.99
    budget_bytes: int | None = None
    widths: tuple[int, ...] = (1, 2, 3, 4, 8)
    grids: tuple[str, ...] = ("balanced", "plain")
    eta: float = 0.0
    keep: tuple[str, ...] = ("first", "last", "time_embedding")
    sensitivity: str = "local"
    calibration: int = 4
    scale_init: str = "als"
    cache_time_embedding: bool = True
    time_cache_max_ratio: float | None = 2.0  # skip the cache if its table outweighs 2x the fp16 MLP
    storage_dtype: str = "float16"
    codec: str = "rans"
    qat: QATConfig | None = None  # two-stage quantization-aware training instead of rounding once
    version: int = RECIPE_VERSION

    @property
    def trains(self) -> bool:
        """True when the recipe needs training data (quantization-aware training)."""
        return self.qat is not None

    def options(self) -> tuple[str, ...]:
        """Return the option keys (grid, width) the allocator may choose from."""
        keys = []
        for bits in self.widths:
            for grid in self.grids:
                if grid == "plain" and bits == 1 or grid == "balanced" and bits == 8 and "plain" in self.grids:
                    continue  # a 2-level {-1, 0} grid is useless; balanced 8-bit adds nothing over plain
                keys.append(QuantSpec(bits, grid).key)
        return tuple(keys)

    def validate(self) -> BitsFusionRecipe:
        """Return self, or raise RecipeError naming the first invalid field."""
        _common_checks(self)
        if not self.widths or any(not isinstance(b, int) or not 1 <= b <= 8 for b in self.widths):
            raise RecipeError(f"widths must be integers in 1..8, got {list(self.widths)}")
        if not self.grids or any(g not in GRIDS for g in self.grids):
            raise RecipeError(f"grids must be among {GRIDS}, got {list(self.grids)}")
        if (self.target_bits is None) == (self.budget_bytes is None):
            raise RecipeError("give exactly one of target_bits and budget_bytes")
        costs = {k: QuantSpec.from_key(k).cost_bits for k in self.options()}
        if self.target_bits is not None and not _is_number(self.target_bits):
            raise RecipeError(f"target_bits must be a number of bits per weight, got {self.target_bits!r}")
        if self.target_bits is not None and self.target_bits < min(costs.values()) - 1e-12:
            narrowest = min(costs, key=costs.get)
            raise RecipeError(f"a target of {self.target_bits} bits per weight is below the lowest possible, "
                              f"{costs[narrowest]:.3f} ({narrowest}: every layer at the narrowest option of widths "
                              f"{list(self.widths)} and grids {list(self.grids)})")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise RecipeError(f"budget_bytes must be positive, got {self.budget_bytes}")
        if not 0 <= self.eta <= 1:
            raise RecipeError(f"eta must be in [0, 1], got {self.eta}")
        if self.sensitivity not in ("local", "hybrid", "e2e"):
            raise RecipeError(f"sensitivity must be 'local', 'hybrid' or 'e2e', got {self.sensitivity!r}")
        if self.calibration < 1:
            raise RecipeError(f"calibration must be at least 1, got {self.calibration}")
        return self

    def passes(self) -> list[Pass]:
        """Return the pass list this recipe stands for."""
        return [
            *([CacheTimeEmbedding(max_table_ratio=self.time_cache_max_ratio)] if self.cache_time_embedding else []),
            SelectLayers(list(self.keep)),
            MeasureSensitivity(self.sensitivity, self.options(), self.calibration, self.scale_init),
            AllocateBits(self.target_bits, self.budget_bytes, self.options(), self.eta, self.sensitivity,
                         self.scale_init, cost_model="entropy" if self.codec == "rans" else "log2"),
            *_quantize(self.qat),
            RoundToStorage(self.storage_dtype),
        ]


@dataclass(frozen=True)
class UniformRecipe:
    """Every selected layer at one width and grid (default: plain 2-bit, min-max scales, the usual baseline).

    Give the width as `bits`, or as `target_bits` like the other quantizing recipes: the widest width
    whose grid costs at most that many bits per weight (a balanced 2-bit grid costs 2.32).
    """

    name: ClassVar[str] = "uniform"
    bits: int | None = None  # None: from target_bits, else 2
    target_bits: float | None = None
    grid: str = "plain"
    scale_init: str = "minmax"
    keep: tuple[str, ...] = ("first", "last", "time_embedding")
    cache_time_embedding: bool = False
    storage_dtype: str = "float16"
    codec: str = "rans"
    qat: QATConfig | None = None
    version: int = RECIPE_VERSION

    @property
    def trains(self) -> bool:
        """True when the recipe needs training data (quantization-aware training)."""
        return self.qat is not None

    @property
    def width(self) -> int:
        """The width every selected layer gets: `bits`, else the widest within `target_bits`, else 2."""
        if self.bits is not None:
            return self.bits
        if self.target_bits is None:
            return 2
        fitting = [b for b in range(1, 9) if QuantSpec(b, self.grid).cost_bits <= self.target_bits + 1e-12]
        return max(fitting) if fitting else 0

    def validate(self) -> UniformRecipe:
        """Return self, or raise RecipeError naming the first invalid field."""
        _common_checks(self)
        if self.bits is not None and (not isinstance(self.bits, int) or isinstance(self.bits, bool)
                                      or not 1 <= self.bits <= 8):
            raise RecipeError(f"bits must be an integer in 1..8, got {self.bits!r}")
        if self.grid not in GRIDS:
            raise RecipeError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if self.target_bits is not None:
            if not _is_number(self.target_bits):
                raise RecipeError(f"target_bits must be a number of bits per weight, got {self.target_bits!r}")
            lowest = QuantSpec(1, self.grid).cost_bits
            if self.width == 0:
                raise RecipeError(f"a target of {self.target_bits} bits per weight is below the lowest possible "
                                  f"with the {self.grid} grid, {lowest:.3f}")
            if self.bits is not None and QuantSpec(self.bits, self.grid).cost_bits > self.target_bits + 1e-12:
                raise RecipeError(f"bits={self.bits} ({self.grid}) costs "
                                  f"{QuantSpec(self.bits, self.grid).cost_bits:.3f} bits per weight, over "
                                  f"target_bits={self.target_bits}; give one of the two")
        return self

    def passes(self) -> list[Pass]:
        """Return the pass list this recipe stands for."""
        spec = QuantSpec(self.width, self.grid, scale_init=self.scale_init)
        return [*([CacheTimeEmbedding()] if self.cache_time_embedding else []), SelectLayers(list(self.keep)),
                AssignUniform(spec), *_quantize(self.qat), RoundToStorage(self.storage_dtype)]


@dataclass(frozen=True)
class TriLevelRecipe:
    """Tri-level structured pruning (blocks, heads, channel groups) to a budget of latency, FLOPs or
    parameters, scored by KD (or magnitude / random), with optional KD recovery; `quantize` names a
    quantization recipe ('bitsfusion', 'uniform') to run on the pruned model with its defaults."""

    name: ClassVar[str] = "trilevel"
    prune: PruneConfig = field(default_factory=PruneConfig)  # flat keys (cost, budget, ...) fold into it
    recovery_steps: int = 0
    round_recovery_steps: int = 0
    trial_recovery_steps: int = 0  # KD recovery of each round's candidate plans before they are compared
    calibration: int = 4
    quantize: str | None = None
    target_bits: float | None = None  # the quantize recipe's target (its default when None)
    codec: str = "rans"
    keep: tuple[str, ...] = ()  # module-path globs that pruning never removes or narrows
    version: int = RECIPE_VERSION

    @property
    def trains(self) -> bool:
        """True when KD recovery needs training data."""
        return self.recovery_steps > 0 or self.round_recovery_steps > 0 or self.trial_recovery_steps > 0

    def validate(self) -> TriLevelRecipe:
        """Return self, or raise RecipeError naming the first invalid field."""
        if self.version != RECIPE_VERSION:
            raise RecipeError(f"recipe version {self.version} is not supported (this fxpress: {RECIPE_VERSION})")
        if not isinstance(self.prune, PruneConfig):
            raise RecipeError(f"prune must be a PruneConfig or a table of its fields, got {type(self.prune).__name__}")
        if min(self.recovery_steps, self.round_recovery_steps, self.trial_recovery_steps) < 0 or self.calibration < 1:
            raise RecipeError("recovery steps must be >= 0 and calibration >= 1")
        if self.quantize is not None and self.quantize not in ("bitsfusion", "uniform"):
            raise RecipeError(f"quantize must be 'bitsfusion', 'uniform' or absent, got {self.quantize!r}")
        if self.target_bits is not None and self.quantize is None:
            raise RecipeError("target_bits needs a quantization stage: set quantize = 'bitsfusion' or 'uniform' "
                              "(CLI: --then bitsfusion)")
        if self.quantize is not None:
            self.quantize_recipe()  # its target is checked now, before pruning starts
        if any(not isinstance(k, str) or not k for k in self.keep):
            raise RecipeError(f"keep entries must be non-empty strings, got {list(self.keep)}")
        return self

    def quantize_recipe(self) -> BitsFusionRecipe | UniformRecipe:
        """Return the validated quantization recipe run after pruning (raises RecipeError if none is set)."""
        if self.quantize is None:
            raise RecipeError("this trilevel recipe has no quantization stage")
        settings = {} if self.target_bits is None else {"target_bits": self.target_bits}
        return replace(RECIPES[self.quantize](), codec=self.codec, **settings).validate()

    def passes(self) -> list[Pass]:
        """Return the pass list this recipe stands for: prune, then (optionally) quantize."""
        config = replace(self.prune, keep=tuple(self.keep))
        prune = TriLevelPrune(config, self.recovery_steps, self.round_recovery_steps,
                              trial_recovery_steps=self.trial_recovery_steps)
        return [prune, *(self.quantize_recipe().passes() if self.quantize else [])]


STAGES = {"guidance": GuidanceDistill, "progressive": ProgressiveDistill, "adversarial": AdversarialDistill}


@dataclass(frozen=True)
class DistillRecipe:
    """Step distillation: `method` names one stage or several joined by '+', run in order
    ('guidance+progressive', 'progressive+adversarial'); `distill` holds their settings (a DistillConfig;
    `steps` is where the sampler ends). With `quantize` ('bitsfusion' or 'uniform', at `target_bits`, with
    optional `qat`), the student is fake-quantized first, distilled as such and frozen into packed
    low-bit layers at the end: a low-bit few-step model in one recipe.
    """

    name: ClassVar[str] = "distill"
    method: str = "progressive"
    distill: DistillConfig = field(default_factory=DistillConfig)
    quantize: str | None = None
    target_bits: float | None = None
    qat: QATConfig | None = None
    codec: str = "rans"
    keep: tuple[str, ...] = ()
    calibration: int = 4
    low_bit_student: bool = False  # the model arrives fake-quantized (fxpress.load_trainable): freeze it at the end
    version: int = RECIPE_VERSION

    trains: ClassVar[bool] = True

    @property
    def stages(self) -> list[str]:
        """The distillation stages in order."""
        return [m.strip() for m in self.method.split("+")]

    def validate(self) -> DistillRecipe:
        """Return self, or raise RecipeError naming the first invalid field."""
        if self.version != RECIPE_VERSION:
            raise RecipeError(f"recipe version {self.version} is not supported (this fxpress: {RECIPE_VERSION})")
        unknown = [m for m in self.stages if m not in STAGES]
        if unknown or not self.stages:
            raise RecipeError(f"distill method {self.method!r}: each stage must be one of {', '.join(STAGES)} "
                              "(joined by '+')")
        if not isinstance(self.distill, DistillConfig):
            raise RecipeError(f"distill must be a DistillConfig or a table of its fields, got "
                              f"{type(self.distill).__name__}")
        for stage in self.stages:
            replace(self.distill, method=stage).validate()
        low, high = self.distill.guidance
        if "progressive" in self.stages and low != high and "guidance" not in self.stages[:self.stages.index(
                "progressive")]:
            raise RecipeError(f"progressive distillation of a model without a guidance input folds one guidance "
                              f"weight, but distill.guidance is the range {[low, high]}: give one value, or use "
                              "method = 'guidance+progressive'")
        if self.quantize is not None and self.quantize not in ("bitsfusion", "uniform"):
            raise RecipeError(f"quantize must be 'bitsfusion', 'uniform' or absent, got {self.quantize!r}")
        if (self.target_bits is not None or self.qat is not None) and self.quantize is None:
            raise RecipeError("target_bits and qat need a quantization stage: set quantize = 'bitsfusion' or "
                              "'uniform'")
        if self.quantize is not None:
            if self.low_bit_student:
                raise RecipeError("the model is low-bit already (an artifact): leave quantize unset")
            self.quantize_recipe()
        return self

    def quantize_recipe(self) -> BitsFusionRecipe | UniformRecipe:
        """Return the validated quantization recipe whose fake-quantized model is distilled."""
        settings = {} if self.target_bits is None else {"target_bits": self.target_bits}
        if "guidance" in self.stages and self.quantize == "bitsfusion":
            settings["cache_time_embedding"] = False  # the guidance input is added to the time embedding's output
        return replace(RECIPES[self.quantize](), codec=self.codec, qat=self.qat, **settings).validate()

    def passes(self) -> list[Pass]:
        """Return the passes: [quantization up to fake-quant insertion (and QAT)], the distillation stages,
        [freeze into low-bit layers and the rest of the quantization recipe]."""
        stages = [STAGES[m](replace(self.distill, method=m)) for m in self.stages]
        if self.quantize is None:
            return [*stages, FreezeQuantized()] if self.low_bit_student else stages
        before, after = [], []
        for p in self.quantize_recipe().passes():
            if isinstance(p, (QuantizeWeights, InsertFakeQuant)):
                before.append(InsertFakeQuant(p.scale_init if isinstance(p, InsertFakeQuant) else "recipe"))
            elif isinstance(p, FreezeQuantized):
                continue
            elif isinstance(p, RoundToStorage) or after:
                after.append(p)
            else:
                before.append(p)
        return [*before, *stages, FreezeQuantized(), *after]


@dataclass(frozen=True)
class AdapterRecipe:
    """Adapter training: a LoRA branch named `branch` (role "adapter" or "train_only") of rank `rank` on the
    layers `lora` selects (`fxpress.ir.select`), trained on the denoising loss as `train` says (an
    AdapterConfig: steps, batch, learning rates, EMA, base layers trained too)."""

    name: ClassVar[str] = "adapter"
    lora: tuple[str, ...] = (r"to_(q|k|v|out\.0)",)
    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    branch: str = "lora"
    role: str = "adapter"
    train: AdapterConfig = field(default_factory=AdapterConfig)
    keep: tuple[str, ...] = ()
    calibration: int = 4
    version: int = RECIPE_VERSION

    trains: ClassVar[bool] = True

    def validate(self) -> AdapterRecipe:
        """Return self, or raise RecipeError naming the first invalid field."""
        if self.version != RECIPE_VERSION:
            raise RecipeError(f"recipe version {self.version} is not supported (this fxpress: {RECIPE_VERSION})")
        if not isinstance(self.train, AdapterConfig):
            raise RecipeError(f"train must be an AdapterConfig or a table of its fields, got "
                              f"{type(self.train).__name__}")
        self.train.validate()
        self.passes()  # rank, role, targets and the branch name are checked by the passes themselves
        return self

    def passes(self) -> list[Pass]:
        """Return the passes: insert the LoRA branch, then train it."""
        return [InsertLoRA(list(self.lora), self.rank, self.alpha, self.dropout, self.branch, self.role,
                           seed=self.train.seed),
                TrainBranches(self.train)]


RECIPES: dict[str, type] = {"bitsfusion": BitsFusionRecipe, "uniform": UniformRecipe, "trilevel": TriLevelRecipe,
                           "distill": DistillRecipe, "adapter": AdapterRecipe}
Recipe = BitsFusionRecipe | UniformRecipe | TriLevelRecipe | DistillRecipe | AdapterRecipe


def _quantize(qat: QATConfig | None) -> list[Pass]:
    """Round once (post-training), or insert fake quantization, train and freeze."""
    return [QuantizeWeights()] if qat is None else qat_passes(qat)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _common_checks(recipe: Any) -> None:
    if recipe.version != RECIPE_VERSION:
        raise RecipeError(f"recipe version {recipe.version} is not supported (this fxpress: {RECIPE_VERSION})")
    if recipe.scale_init not in ("als", "minmax"):
        raise RecipeError(f"scale_init must be 'als' or 'minmax', got {recipe.scale_init!r}")
    if recipe.storage_dtype not in ("float16", "bfloat16", "float32"):
        raise RecipeError(f"storage_dtype must be float16, bfloat16 or float32, got {recipe.storage_dtype!r}")
    if recipe.codec not in ("rans", "radix"):
        raise RecipeError(f"codec must be 'rans' (entropy-coded) or 'radix' (fixed rate), got {recipe.codec!r}")
    if recipe.qat is not None and not isinstance(recipe.qat, QATConfig):
        raise RecipeError(f"qat must be a QATConfig or a table of its fields, got {type(recipe.qat).__name__}")
    if any(not isinstance(k, str) or not k for k in recipe.keep):
        raise RecipeError(f"keep entries must be non-empty strings, got {list(recipe.keep)}")


_TYPE_WORDS = {"float": "a number", "int": "an integer", "str": "a string", "bool": "true or false",
               "tuple[int, ...]": "a list of integers", "tuple[str, ...]": "a list of strings"}


def _fits(value: Any, kind: str) -> bool:
    if kind.startswith("tuple["):
        item = kind[len("tuple["):].split(",")[0]
        return isinstance(value, tuple) and all(_fits(v, item) for v in value)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {"str": str, "bool": bool}.get(kind, object))


def _checked_types(config: type, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return `data` with whole floats given for int fields made ints; raise RecipeError naming the first field
    whose value has another type than the field declares (a string for a number, one name for a list, ...)."""
    out = dict(data)
    for f in fields(config):
        if f.name not in data:
            continue
        value, kind = data[f.name], str(f.type).replace(" | None", "")
        if value is None and "None" in str(f.type):
            continue
        if kind == "int" and isinstance(value, float) and value.is_integer():
            value = out[f.name] = int(value)
        if kind in _TYPE_WORDS and not _fits(value, kind):
            shown = list(value) if isinstance(value, tuple) else value
            raise RecipeError(f"recipe field {prefix}{f.name} must be {_TYPE_WORDS[kind]}, got {shown!r}")
    return out


def _adapter_config(table: dict[str, Any]) -> AdapterConfig:
    known = {f.name for f in fields(AdapterConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise RecipeError(f"unknown adapter training field(s) {unknown}; known: {sorted(known)}")
    table = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    return AdapterConfig(**_checked_types(AdapterConfig, table, "train."))


def _fold_prune(base: TriLevelRecipe, data: dict[str, Any]) -> dict[str, Any]:
    """Flat pruning keys (cost = "flops", budget = 0.5, ...) and a [prune] table become one PruneConfig."""
    names = {f.name for f in fields(PruneConfig)} - {"keep"}  # keep stays the recipe's (it also protects layers)
    flat = {k: data.pop(k) for k in list(data) if k in names}
    table = data.pop("prune", None)
    if table is not None and not isinstance(table, (dict, PruneConfig)):
        raise RecipeError(f"prune must be a table of pruning settings, got {table!r}")
    table = vars(table) if isinstance(table, PruneConfig) else dict(table or {})
    if flat or table:
        merged = {k: tuple(v) if isinstance(v, list) else v for k, v in {**vars(base.prune), **table, **flat}.items()}
        merged = _checked_types(PruneConfig, merged, "prune.")
        try:
            data["prune"] = PruneConfig(**merged)
        except TypeError as exc:
            raise RecipeError(f"invalid pruning settings: {exc}") from exc
    return data


def make_recipe(spec: str | Path | dict[str, Any] | Recipe, **overrides: Any) -> Recipe:
    """Return a validated recipe from a name ('bitsfusion'), a TOML file, a dict or a recipe, with overrides.

    Raises RecipeError for an unknown name or field, or an invalid value.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None or k == "target_bits"}
    if overrides.get("target_bits", 0) is None and "budget_bytes" not in overrides:
        overrides.pop("target_bits")
    if isinstance(spec, tuple(RECIPES.values())):  # any registered recipe, user-defined ones too
        base, data = spec, {}
    else:
        if isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith(".toml")):
            try:
                data = tomllib.loads(Path(spec).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise RecipeError(f"cannot read recipe {spec}: {exc}") from exc
        elif isinstance(spec, dict):
            data = dict(spec)
        else:
            data = {"recipe": spec}
        name = data.pop("recipe", "bitsfusion")
        if name not in RECIPES:
            raise RecipeError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
        base = RECIPES[name]()
    for table in ("qat", "distill", "train"):  # --qat / --steps refine a recipe's table, not replace it
        if isinstance(overrides.get(table), dict):
            earlier = data.get(table) or (vars(getattr(base, table)) if getattr(base, table, None) is not None else {})
            overrides = {**overrides, table: {**earlier, **overrides[table]}}
    data.update(overrides)
    if isinstance(base, TriLevelRecipe):
        data = _fold_prune(base, data)
    known = {f.name for f in fields(base)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"unknown recipe field(s) {unknown} for {base.name!r}; known: {sorted(known)}")
    data = _checked_types(type(base), {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    if "qat" in data:
        data["qat"] = QATConfig.of(data["qat"])
    if "distill" in data:
        data["distill"] = DistillConfig.of(data["distill"], check=False)  # checked per stage by validate()
    if isinstance(data.get("train"), dict):
        data["train"] = _adapter_config(data["train"])
    if data.get("budget_bytes") is not None and "target_bits" not in data:
        data["target_bits"] = None
    try:
        return replace(base, **data).validate()
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"invalid recipe: {exc}") from exc
