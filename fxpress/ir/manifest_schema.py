"""The fields of an artifact manifest that readers use, each checked for the type and range a writer produces.

`check_manifest` runs before any field is used, so the loader, `fxpress inspect` and the exporters can
trust what they read: a damaged or hand-edited manifest is an ArtifactError naming the field (as a path
such as `lowbit_layers['conv'].weight_shape`), never a KeyError or TypeError deep inside a reader.
Names of modules and tensors must be dotted identifiers: no '..', '/' or empty parts.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, NoReturn

from fxpress.errors import ArtifactError

MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SHA256 = re.compile(r"[0-9a-f]{64}")
DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
LIBRARIES = ("diffusers", "transformers", "module")
CODECS = ("rans", "radix")
MAX_LEVELS = 2**16  # the widest field the run-time layout packs (kernels.packing.field_width)
MAX_INPUT_ELEMENTS = 2**31  # an example input larger than this is not one a writer recorded


class _Fields:
    """Checks values at named places of one manifest; each failure is an ArtifactError naming the place."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, what: str) -> NoReturn:
        raise ArtifactError(f"{self.path}: field {where} {what}")

    def obj(self, value: Any, where: str, optional: bool = False) -> dict:
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            self.fail(where, f"must be a JSON object, got {_kind(value)}")
        return value

    def array(self, value: Any, where: str) -> list:
        if not isinstance(value, list):
            self.fail(where, f"must be a JSON list, got {_kind(value)}")
        return value

    def integer(self, value: Any, where: str, low: int | None = None, high: int | None = None) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(where, f"must be an integer, got {_kind(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(where, f"is {value}, outside [{low if low is not None else '-inf'}, "
                             f"{high if high is not None else 'inf'}]")
        return value

    def number(self, value: Any, where: str, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.fail(where, f"must be a number, got {_kind(value)}")

    def text(self, value: Any, where: str, pattern: re.Pattern | None = None,
            choices: tuple[str, ...] | None = None, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str):
            self.fail(where, f"must be a string, got {_kind(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(where, f"is {value[:80]!r}, not a name of the expected form")
        if choices is not None and value not in choices:
            self.fail(where, f"is {value[:80]!r}; expected one of {', '.join(choices)}")

    def shape(self, value: Any, where: str, positive: bool = False, rank: tuple[int, ...] | None = None) -> list:
        dims = self.array(value, where)
        for i, dim in enumerate(dims):
            self.integer(dim, f"{where}[{i}]", low=1 if positive else 0)
        if rank is not None and len(dims) not in rank:
            self.fail(where, f"has {len(dims)} dimensions; expected {' or '.join(map(str, rank))}")
        return dims

    def by_path(self, value: Any, where: str) -> dict:
        """Check a JSON object keyed by module paths (absent: empty) and return it."""
        table = self.obj(value, where, optional=True)
        for key in table:
            self.text(key, f"{where} key", MODULE_PATH)
        return table


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_layer(f: _Fields, entry: Any, where: str) -> None:
    entry = f.obj(entry, where)
    f.text(entry.get("kind"), f"{where}.kind", choices=("linear", "conv2d"))
    levels = f.integer(entry.get("levels"), f"{where}.levels", 2, MAX_LEVELS)
    f.integer(entry.get("qmin"), f"{where}.qmin", -(levels - 1), 0)  # the offset -qmin is a level
    f.shape(entry.get("weight_shape"), f"{where}.weight_shape", positive=True,
            rank=(2,) if entry["kind"] == "linear" else (4,))
    f.text(entry.get("codec"), f"{where}.codec", choices=CODECS)
    f.integer(entry.get("coded_bytes"), f"{where}.coded_bytes", 0)
    if "entropy_bits" in entry:
        f.number(entry["entropy_bits"], f"{where}.entropy_bits")
    if entry["kind"] == "conv2d":
        for name, low in (("stride", 1), ("padding", 0), ("dilation", 1)):
            values = f.array(entry.get(name), f"{where}.{name}")
            if len(values) != 2:
                f.fail(f"{where}.{name}", f"must hold 2 integers, got {len(values)} values")
            for i, v in enumerate(values):
                f.integer(v, f"{where}.{name}[{i}]", low)
        f.integer(entry.get("groups"), f"{where}.groups", 1)


def _check_input_spec(f: _Fields, spec: Any, where: str) -> None:
    spec = f.obj(spec, where)
    shape = f.shape(spec.get("shape"), f"{where}.shape")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        f.fail(f"{where}.shape", f"describes {math.prod(shape):,} elements, more than {MAX_INPUT_ELEMENTS:,}")
    f.text(spec.get("dtype"), f"{where}.dtype", choices=DTYPES)
    if "low" in spec or "high" in spec:
        low = f.integer(spec.get("low"), f"{where}.low")
        f.integer(spec.get("high"), f"{where}.high", low + 1)


def _check_inputs(f: _Fields, inputs: Any) -> None:
    if inputs is None:
        return
    inputs = f.obj(inputs, "inputs")
    for i, spec in enumerate(f.array(inputs.get("args", []), "inputs.args")):
        _check_input_spec(f, spec, f"inputs.args[{i}]")
    for key, spec in f.obj(inputs.get("kwargs", {}), "inputs.kwargs").items():
        f.text(key, "inputs.kwargs key", IDENTIFIER)
        _check_input_spec(f, spec, f"inputs.kwargs[{key!r}]")


def _check_source(f: _Fields, source: Any) -> None:
    source = f.obj(source, "source")
    f.text(source.get("library"), "source.library", choices=LIBRARIES)
    f.text(source.get("class"), "source.class")
    f.obj(source.get("config"), "source.config", optional=True)
    if source["library"] == "transformers":
        f.text(source.get("config_class"), "source.config_class")


def _check_structure(f: _Fields, structure: Any) -> None:
    structure = f.obj(structure, "structure", optional=True)
    for path, stream in f.by_path(structure.get("bypass"), "structure.bypass").items():
        where = f"structure.bypass[{path!r}]"
        stream = f.obj(stream, where)
        if stream.get("position") is not None:
            f.integer(stream["position"], f"{where}.position", 0)
        f.text(stream.get("keyword"), f"{where}.keyword", IDENTIFIER, optional=True)
        if (stream.get("position") is None) == (stream.get("keyword") is None):
            f.fail(where, "must give exactly one of position and keyword")
        if not isinstance(stream.get("returns_tuple", False), bool):
            f.fail(f"{where}.returns_tuple", f"must be a boolean, got {_kind(stream['returns_tuple'])}")
    attributes = f.obj(structure.get("attributes"), "structure.attributes", optional=True)
    for path, attrs in attributes.items():
        where = f"structure.attributes[{path!r}]"
        if path:
            f.text(path, "structure.attributes key", MODULE_PATH)
        for attr, value in f.obj(attrs, where).items():
            f.text(attr, f"{where} key", IDENTIFIER)
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                f.integer(v, f"{where}.{attr}" + (f"[{i}]" if isinstance(value, list) else ""), 1)


def _check_branch_spec(f: _Fields, spec: Any, where: str) -> None:
    from fxpress.ir.annotations import BRANCH_KINDS, BRANCH_ROLES

    spec = f.obj(spec, where)
    f.text(spec.get("name"), f"{where}.name", IDENTIFIER)
    f.text(spec.get("kind"), f"{where}.kind", choices=BRANCH_KINDS)
    f.text(spec.get("role"), f"{where}.role", choices=BRANCH_ROLES)
    f.number(spec.get("scale"), f"{where}.scale")


def _check_branches(f: _Fields, branches: Any) -> None:
    for name, entry in f.obj(branches, "branches", optional=True).items():
        where = f"branches[{name!r}]"
        entry = f.obj(entry, where)
        _check_branch_spec(f, {**entry, "name": name}, where)
        for key in ("targets", "merged"):
            for i, target in enumerate(f.array(entry.get(key, []), f"{where}.{key}")):
                f.text(target, f"{where}.{key}[{i}]", MODULE_PATH)
        if entry.get("params") is not None:
            f.integer(entry["params"], f"{where}.params", 0, 1 << 50)
        if entry.get("kind") == "image_adapter":
            f.text(entry.get("input"), f"{where}.input", IDENTIFIER)
            for key in ("features", "tokens", "width"):
                f.integer(entry.get(key), f"{where}.{key}", 1, 1 << 20)
            if entry.get("image_channels") is not None:
                f.integer(entry["image_channels"], f"{where}.image_channels", 1, 1 << 12)
            for key in ("modules", "wrappers"):
                for i, path in enumerate(f.array(entry.get(key), f"{where}.{key}")):
                    f.text(path, f"{where}.{key}[{i}]", MODULE_PATH)
        if entry.get("kind") == "control":
            f.text(entry.get("input"), f"{where}.input", IDENTIFIER)
            f.integer(entry.get("channels"), f"{where}.channels", 1, 1 << 12)
            for i, width in enumerate(f.array(entry.get("embedding_channels"), f"{where}.embedding_channels")[:16]):
                f.integer(width, f"{where}.embedding_channels[{i}]", 1, 1 << 16)
            for key in ("modules", "scale_modules", "wrappers"):
                for i, path in enumerate(f.array(entry.get(key, []), f"{where}.{key}")):
                    if path:
                        f.text(path, f"{where}.{key}[{i}]", MODULE_PATH)
            if entry.get("blocks") is not None:  # a transformer's control branch
                f.text(entry["blocks"], f"{where}.blocks", MODULE_PATH)
                f.text(entry.get("embed"), f"{where}.embed", MODULE_PATH)
                f.text(entry.get("sample_input"), f"{where}.sample_input", IDENTIFIER)
                f.integer(entry.get("count"), f"{where}.count", 1, 1 << 12)
                f.integer(entry.get("width"), f"{where}.width", 1, 1 << 20)
        if entry.get("kind") == "lora":
            f.integer(entry.get("rank"), f"{where}.rank", 1, 1 << 16)
            f.number(entry.get("alpha"), f"{where}.alpha")
            f.number(entry.get("dropout"), f"{where}.dropout")
            if not isinstance(entry.get("fused"), bool):
                f.fail(f"{where}.fused", f"must be true or false, got {_kind(entry.get('fused'))}")


def _check_annotations(f: _Fields, annotations: Any) -> None:
    for path, ann in f.by_path(annotations, "annotations").items():
        where = f"annotations[{path!r}]"
        ann = f.obj(ann, where)
        if ann.get("quant") is not None:
            quant = f.obj(ann["quant"], f"{where}.quant")
            f.integer(quant.get("bits"), f"{where}.quant.bits", 1, 8)
            f.text(quant.get("grid"), f"{where}.quant.grid", choices=("balanced", "plain"))
        f.text(ann.get("keep_reason"), f"{where}.keep_reason", optional=True)
        if ann.get("branch") is not None:
            _check_branch_spec(f, ann["branch"], f"{where}.branch")
        f.number(ann.get("weight_error"), f"{where}.weight_error", optional=True)
        for mode, sens in f.obj(ann.get("sensitivity"), f"{where}.sensitivity", optional=True).items():
            errors = f.obj(f.obj(sens, f"{where}.sensitivity[{mode!r}]").get("error"),
                            f"{where}.sensitivity[{mode!r}].error", optional=True)
            for key, value in errors.items():
                f.number(value, f"{where}.sensitivity[{mode!r}].error[{key!r}]", optional=True)


def _check_tensor_records(f: _Fields, manifest: dict[str, Any]) -> None:
    if manifest["format_version"] >= 2:
        if "tensors_file" not in manifest:
            f.fail("tensors_file", "is missing: the manifest lacks the size and sha256 of the tensors file")
        info = f.obj(manifest["tensors_file"], "tensors_file")
        f.integer(info.get("bytes"), "tensors_file.bytes", 0)
        f.text(info.get("sha256"), "tensors_file.sha256", SHA256)
        if "count" in info:
            f.integer(info["count"], "tensors_file.count", 0)
        return
    for name, info in f.obj(manifest.get("tensors", {}), "tensors").items():
        where = f"tensors[{name!r}]"
        info = f.obj(info, where)
        f.text(info.get("dtype"), f"{where}.dtype", choices=DTYPES)
        f.shape(info.get("shape"), f"{where}.shape")
        f.text(info.get("sha256"), f"{where}.sha256", SHA256)


def _check_wrapper(f: _Fields, wrapper: Any) -> None:
    wrapper = f.obj(wrapper, "wrapper", optional=True)
    if not wrapper:
        return
    f.text(wrapper.get("kind"), "wrapper.kind", choices=("guidance_input",))
    f.text(wrapper.get("site"), "wrapper.site", MODULE_PATH)
    f.integer(wrapper.get("width"), "wrapper.width", 1, 1 << 20)
    f.integer(wrapper.get("features"), "wrapper.features", 2, 1 << 16)
    f.number(wrapper.get("scale"), "wrapper.scale")


def _check_sampler(f: _Fields, sampler: Any) -> None:
    sampler = f.obj(sampler, "sampler", optional=True)
    if not sampler:
        return
    from fxpress.errors import FxpressError
    from fxpress.ir.sampler import SamplerSpec

    for key in ("timesteps", "prev_timesteps", "alphas_cumprod"):
        for i, value in enumerate(f.array(sampler.get(key), f"sampler.{key}")[:100_000]):
            (f.number if key == "alphas_cumprod" else f.integer)(value, f"sampler.{key}[{i}]")
    try:
        SamplerSpec.from_json(sampler)
    except FxpressError as exc:
        f.fail("sampler", f"does not describe a sampler: {exc}")


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Raise ArtifactError naming the first field of `manifest` (read from `path`) that no fxpress writer makes.

    Expects `format_version` already checked to be a readable integer version.
    """
    f = _Fields(path)
    _check_tensor_records(f, manifest)
    _check_source(f, manifest.get("source"))
    for layer, entry in f.by_path(manifest.get("lowbit_layers"), "lowbit_layers").items():
        _check_layer(f, entry, f"lowbit_layers[{layer!r}]")
    if not isinstance(manifest.get("dtypes"), dict):
        f.fail("dtypes", f"must be a JSON object of each tensor's dtype, got {_kind(manifest.get('dtypes'))}")
    for name, dtype in f.by_path(manifest["dtypes"], "dtypes").items():
        f.text(dtype, f"dtypes[{name!r}]", choices=DTYPES)
    time_cache = f.obj(manifest.get("time_cache"), "time_cache", optional=True)
    if time_cache:
        for i, module in enumerate(f.array(time_cache.get("modules"), "time_cache.modules")):
            f.text(module, f"time_cache.modules[{i}]", MODULE_PATH)
        f.text(time_cache.get("timestep_input"), "time_cache.timestep_input", IDENTIFIER)
    _check_structure(f, manifest.get("structure"))
    _check_wrapper(f, manifest.get("wrapper"))
    _check_sampler(f, manifest.get("sampler"))
    _check_annotations(f, manifest.get("annotations"))
    _check_branches(f, manifest.get("branches"))
    _check_inputs(f, manifest.get("inputs"))
    summary = f.obj(manifest.get("summary"), "summary", optional=True)
    for key in ("weights_only_bits", "output_rel_error"):
        f.number(summary.get(key), f"summary.{key}", optional=True)
    f.text(summary.get("model"), "summary.model", optional=True)
    f.obj(manifest.get("recipe"), "recipe", optional=True)
    if manifest.get("report") is not None:
        f.array(manifest["report"], "report")
