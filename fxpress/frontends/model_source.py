"""Describe how to rebuild a model from data (library, class, config) without pickle."""

from __future__ import annotations

import json
from typing import Any

from torch import nn


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def describe_source(model: nn.Module) -> dict[str, Any]:
    """Return {'library', 'class', 'config'} for diffusers/transformers models, else a generic entry; a
    wrapper that adds inputs (`model.wrapped`, e.g. a guidance input) is described by the model inside."""
    inner = getattr(model, "wrapped", None)
    if isinstance(inner, nn.Module):
        return describe_source(inner)
    cls = type(model)
    name = f"{cls.__module__}:{cls.__qualname__}"
    try:
        from diffusers import ModelMixin
        if isinstance(model, ModelMixin):
            return {"library": "diffusers", "class": name, "config": _jsonable(dict(model.config))}
    except ImportError:
        pass
    try:
        from transformers import PreTrainedModel
        if isinstance(model, PreTrainedModel):
            config_cls = type(model.config)
            return {"library": "transformers", "class": name,
                    "config_class": f"{config_cls.__module__}:{config_cls.__qualname__}",
                    "config": _jsonable(model.config.to_dict())}
    except ImportError:
        pass
    return {"library": "module", "class": name, "config": None}
