"""Load a saved diffusers pipeline with some of its components replaced by fxpress artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from fxpress.backends.torch_load import load
from fxpress.errors import ModelSourceError


def _components(folder: Path) -> dict[str, Any]:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelSourceError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot read {index}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{index} does not hold a JSON object")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def load_pipeline(folder: str | Path, **artifacts: str | Path | nn.Module) -> Any:
    """Return the diffusers pipeline saved in `folder`, each component named in `artifacts` replaced by
    the fxpress model of that artifact directory (or a model already loaded), e.g.
    `load_pipeline("pipe", unet="unet-1.99bit")`.

    Everything is read from disk (local files, safetensors only). Raises ModelSourceError when `folder` is no
    pipeline folder, names no such component, or an artifact holds a different class than the component's,
    and ArtifactError for a bad artifact.
    """
    folder = Path(folder)
    components = _components(folder)
    replaced: dict[str, nn.Module] = {}
    for name, artifact in artifacts.items():
        if name not in components:
            raise ModelSourceError(f"the pipeline in {folder} has no component {name!r}; it has "
                                   f"{', '.join(sorted(components))}")
        model = artifact if isinstance(artifact, nn.Module) else load(artifact)
        expected = components[name][1] if isinstance(components[name], list) and len(components[name]) == 2 else None
        if expected and expected not in [c.__name__ for c in type(model).__mro__]:
            raise ModelSourceError(f"{artifact} holds a {type(model).__name__}, but the pipeline's {name!r} is "
                                   f"a {expected}")
        replaced[name] = model
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, **replaced)
    except Exception as exc:  # diffusers raises many types for a bad folder
        raise ModelSourceError(f"cannot load the pipeline in {folder}: {type(exc).__name__}: {exc}") from exc
