"""Resolve the model a user names: a zoo name, a model folder, a pipeline component or a factory.

A model folder is what diffusers' or transformers' `save_pretrained` writes (config.json and
safetensors weights); a pipeline folder holds model_index.json and one subfolder per component. Its
class is looked up by name in diffusers or transformers only, never imported from a module a file
names; a `package.module:factory` string is the user's own code and is imported as written.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxpress.errors import ModelSourceError
from fxpress.frontends import zoo
from fxpress.frontends.calibration import spread_timesteps
from fxpress.frontends.forward_inputs import forward_parameters, inputs_maker
from fxpress.frontends.zoo import ExampleInputs
from fxpress.ir.graph import Inputs

FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
LIBRARIES = ("diffusers", "transformers")


@dataclass
class ModelSource:
    """A model to compress with the interface of a zoo entry, plus `origin`: where it came from (JSON)."""

    name: str
    description: str
    origin: dict[str, Any]
    build_fn: Callable[[int], nn.Module]
    example_fn: Callable[[int], Any]
    calibration_fn: Callable[[int, int], list[Any]]
    training_data: Callable[[], Any] | None = field(default=None)

    def build(self, seed: int = 0) -> nn.Module:
        """Return the model in eval mode (zoo models seeded by `seed`; folders load their saved weights)."""
        return self.build_fn(seed)

    def example_inputs(self, seed: int = 0) -> Any:
        """Return the example inputs for capture (an object with .args and .kwargs, batch 2)."""
        return self.example_fn(seed)

    def calibration_inputs(self, count: int = 4, seed: int = 1) -> list[Any]:
        """Return `count` calibration inputs with timesteps spread over the schedule where there is one."""
        return self.calibration_fn(count, seed)


def resolve_model(model: str, component: str | None = None) -> ModelSource:
    """Return the ModelSource named by `model`: a zoo name, a model folder, a pipeline folder with
    `component`, or `package.module:factory`.

    A zoo name wins over a folder of the same name unless written as a path (./name). Raises
    ModelSourceError for an unknown name, a folder that is neither kind, an unknown or non-model
    component, a class diffusers/transformers do not have, missing safetensors weights, or forward
    arguments that cannot be derived from the config.
    """
    path = Path(model).expanduser()
    if model in zoo.ZOO and os.sep not in model and "/" not in model:
        _no_component(component, f"zoo model {model!r}")
        return _zoo_source(model)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _component_source(model, path, component)
        _no_component(component, f"{model} (no model_index.json, so not a pipeline folder)")
        return _folder_source(model, path)
    if path.exists():
        raise ModelSourceError(f"{model} is a file; give the folder that holds config.json or model_index.json")
    if FACTORY.match(model):
        _no_component(component, f"factory {model!r}")
        return _factory_source(model)
    raise ModelSourceError(f"unknown zoo model {model!r} (known: {', '.join(sorted(zoo.ZOO))}), and no folder "
                           "of that name nor a package.module:factory")


def _no_component(component: str | None, what: str) -> None:
    if component is not None:
        raise ModelSourceError(f"a component ({component!r}) applies to a pipeline folder, not to {what}")


def _derived(make: Callable, timestep_key: str | None) -> tuple[Callable, Callable]:
    """Return (example_fn, calibration_fn) drawing inputs from make(generator, timestep_fraction)."""

    def example(seed: int) -> ExampleInputs:
        return make(torch.Generator().manual_seed(seed), None)

    def calibration(count: int, seed: int) -> list[ExampleInputs]:
        gen = torch.Generator().manual_seed(seed)
        fractions = [None] * count if timestep_key is None else [(i + 0.5) / count for i in range(count)]
        return [make(gen, f) for f in fractions]

    return example, calibration


def _zoo_source(name: str) -> ModelSource:
    entry = zoo.get(name)
    return ModelSource(name, entry.description, {"kind": "zoo", "name": name}, lambda seed: entry.build(seed=seed),
                       lambda seed: entry.example_inputs(seed=seed),
                       lambda count, seed: entry.calibration_inputs(count, seed),
                       getattr(entry, "training_data", None))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path} does not hold a JSON object")
    return data


def _library_class(library: str, name: Any, where: str) -> type:
    """Return the model class `name` of diffusers or transformers (looked up there only)."""
    if library not in LIBRARIES:
        raise ModelSourceError(f"{where}: library {library!r} is not diffusers or transformers")
    if not isinstance(name, str) or not name.isidentifier():
        raise ModelSourceError(f"{where}: {name!r} is not a class name")
    module = importlib.import_module(library)
    base = module.ModelMixin if library == "diffusers" else module.PreTrainedModel
    cls = getattr(module, name, None)
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise ModelSourceError(f"{where}: {library} has no model class {name!r}")
    return cls


def _folder_class(folder: Path, config: dict[str, Any]) -> tuple[str, type]:
    """Return (library, class) a model folder's config.json names."""
    where = str(folder / "config.json")
    if "_class_name" in config:
        return "diffusers", _library_class("diffusers", config["_class_name"], where)
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        return "transformers", _library_class("transformers", architectures[0], where)
    if isinstance(config.get("model_type"), str):
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_MAPPING
        try:
            config_cls = type(AutoConfig.for_model(config["model_type"]))
            return "transformers", MODEL_MAPPING[config_cls]
        except (KeyError, ValueError) as exc:
            raise ModelSourceError(f"{where}: transformers has no model for model_type "
                                   f"{config['model_type']!r}: {exc}") from None
    raise ModelSourceError(f"{where} names no model class: neither diffusers' _class_name nor transformers' "
                           "architectures/model_type")


def _loader(cls: type, folder: Path) -> Callable[[int], nn.Module]:
    """Return build(seed) loading `cls` from `folder`'s safetensors weights in float32, eval mode."""
    if not any(folder.glob("*.safetensors")):
        raise ModelSourceError(f"{folder} holds no .safetensors weights (pickled .bin checkpoints are not loaded)")

    def build(seed: int) -> nn.Module:
        try:
            model = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        except Exception as exc:  # the libraries raise many types for a bad folder
            raise ModelSourceError(f"cannot load {cls.__name__} from {folder}: {type(exc).__name__}: {exc}") from exc
        return model.float().eval()

    return build


def _loaded_source(name: str, origin: dict[str, Any], cls: type, folder: Path, config: dict[str, Any]) -> ModelSource:
    make = inputs_maker(cls.forward, config, f"{cls.__name__} in {folder}")
    key = "timestep" if "timestep" in forward_parameters(cls.forward) else None
    example, calibration = _derived(make, key)
    return ModelSource(name, f"{origin['library']} {cls.__name__} from {folder}", origin, _loader(cls, folder),
                       example, calibration)


def _folder_source(given: str, folder: Path) -> ModelSource:
    if not (folder / "config.json").is_file():
        what = "an fxpress artifact (load it with fxpress.load)" if (folder / "manifest.json").is_file() else (
            "neither a model folder (config.json) nor a pipeline folder (model_index.json)")
        raise ModelSourceError(f"{given} is {what}")
    config = _read_json(folder / "config.json")
    library, cls = _folder_class(folder, config)
    origin = {"kind": "folder", "path": given, "resolved": str(folder.resolve()), "library": library,
              "class": cls.__name__}
    return _loaded_source(given, origin, cls, folder, config)


def pipeline_models(folder: Path) -> dict[str, tuple[str, str]]:
    """Return {component: (library, class name)} of the model components in `folder`/model_index.json."""
    index = _read_json(folder / "model_index.json")
    out = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] not in LIBRARIES:
            continue
        library = importlib.import_module(value[0])
        cls = getattr(library, str(value[1]), None)
        base = library.ModelMixin if value[0] == "diffusers" else library.PreTrainedModel
        if isinstance(cls, type) and issubclass(cls, base):
            out[name] = (value[0], value[1])
    return out


def _component_source(given: str, folder: Path, component: str | None) -> ModelSource:
    models = pipeline_models(folder)
    choices = ", ".join(sorted(models)) or "none"
    if component is None:
        raise ModelSourceError(f"{given} is a pipeline folder: name one of its model components ({choices})")
    if component not in models:
        value = _read_json(folder / "model_index.json").get(component)
        what = "does not exist" if value is None else (
            f"is a {value[1]}, not a model" if isinstance(value, list) and value[1:2] != [None] else "is empty")
        raise ModelSourceError(f"component {component!r} of {given} {what}; its model components: {choices}")
    library, class_name = models[component]
    sub = folder / component
    cls = _library_class(library, class_name, str(folder / "model_index.json"))
    config = _read_json(sub / "config.json")
    origin = {"kind": "pipeline-component", "path": given, "resolved": str(folder.resolve()),
              "component": component, "pipeline": _read_json(folder / "model_index.json").get("_class_name"),
              "library": library, "class": cls.__name__}
    return _loaded_source(f"{given.rstrip('/')}/{component}", origin, cls, sub, config)


def _import_factory(spec: str) -> Callable[[], Any]:
    module_name, _, attr = spec.partition(":")
    added = os.getcwd() not in sys.path
    if added:  # `fxpress` run as a console script does not see the current folder; python -m does
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSourceError(f"cannot import module {module_name!r} of factory {spec!r}: {exc}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSourceError(f"module {module_name!r} has no {attr!r} (factory {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSourceError(f"factory {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def _config_of(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config) if isinstance(config, dict) else {}


def _factory_source(spec: str) -> ModelSource:
    factory = _import_factory(spec)
    origin: dict[str, Any] = {"kind": "factory", "factory": spec}
    calls: dict[int, tuple[nn.Module, Any]] = {}
    hint = "have the factory return (model, example_inputs)"

    def call(seed: int) -> tuple[nn.Module, Any]:
        if seed not in calls:
            torch.manual_seed(seed)
            result = factory()
            model, example = result if isinstance(result, (tuple, list)) and len(result) == 2 else (result, None)
            if not isinstance(model, nn.Module):
                raise ModelSourceError(f"factory {spec!r} returned a {type(result).__name__}; return an nn.Module "
                                       "or (module, example_inputs)")
            origin["class"] = f"{type(model).__module__}:{type(model).__qualname__}"
            calls.clear()
            calls[seed] = (model.eval(), None if example is None else Inputs.of(example))
        return calls[seed]

    def example(seed: int) -> Any:
        model, given = call(seed)
        if given is not None:
            return given
        make = inputs_maker(type(model).forward, _config_of(model), f"factory {spec!r}", hint)
        return make(torch.Generator().manual_seed(seed), None)

    def calibration(count: int, seed: int) -> list[Any]:
        model, given = call(seed)
        if given is not None:
            return spread_timesteps(given, "timestep", count)
        make = inputs_maker(type(model).forward, _config_of(model), f"factory {spec!r}", hint)
        key = "timestep" if "timestep" in forward_parameters(type(model).forward) else None
        return _derived(make, key)[1](count, seed)

    return ModelSource(spec, f"factory {spec}", origin, lambda seed: call(seed)[0], example, calibration)
