"""The programmatic entry points: `compress`, `save`, `load`."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fxpress.backends.torch_load import load as _load
from fxpress.backends.torch_save import artifact_contents
from fxpress.errors import RecipeError
from fxpress.frontends.calibration import spread_timesteps
from fxpress.frontends.capture import capture
from fxpress.frontends.check_model import check_model
from fxpress.ir.artifact import artifact_bytes, write_artifact
from fxpress.ir.graph import Graph, Inputs
from fxpress.passes.context import PassContext
from fxpress.passes.module_edit import timestep_input
from fxpress.passes.pipeline import Pipeline, PipelineReport
from fxpress.passes.quant.allocate_bits import weights_only_bits
from fxpress.passes.quant.select_layers import SPECIAL, resolve_keep
from fxpress.passes.quant.unfreeze import unfreeze
from fxpress.plots import bits_per_layer_png
from fxpress.recipes import Recipe, make_recipe
from fxpress.training.diffusion_data import DiffusionData


@dataclass
class CompressResult:
    """A compressed Graph with the recipe that made it and the per-pass report."""

    graph: Graph
    recipe: Recipe
    report: PipelineReport
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.graph.module



def compress(model: nn.Module, example_inputs: Any, recipe: Any = "bitsfusion", *,
             calibration_inputs: list[Any] | None = None, verify: bool = True,
             training_data: DiffusionData | None = None, checkpoint_dir: str | Path | None = None,
             resume: bool = False, teacher: nn.Module | None = None, **overrides: Any) -> CompressResult:
    """Capture `model`, run the recipe's passes on a copy and return a CompressResult.

    `example_inputs` is a tuple of args, a dict of kwargs, or an object with `.args`/`.kwargs`;
    `calibration_inputs` (same forms) default to the example at timesteps spread over the schedule.
    Overrides such as `target_bits=1.99` replace recipe fields. The recipe and its layer names are
    validated before any pass runs; `model` is never modified. A recipe with `qat` settings trains
    on `training_data` (a DiffusionData), in one process or under torchrun; with `checkpoint_dir` its
    training passes write checkpoints there, and `resume` continues from them. Training passes distil
    from `teacher` (default: `model` as given), e.g. the original model when `model` is a distilled student.
    """
    recipe = make_recipe(recipe, **overrides)
    model = check_model(model, example_inputs)  # ModelError for bad weights or inputs; an eval copy if training
    example = Inputs.of(example_inputs)
    if recipe.trains and training_data is None:
        raise RecipeError(f"the {recipe.name} recipe trains (QAT or KD recovery) but no training_data was given")
    graph = capture(model, example.args, example.kwargs)
    if calibration_inputs:
        graph.calibration = [Inputs.of(c) for c in calibration_inputs]
    else:
        t_name = timestep_input(graph.input_names)
        count = getattr(recipe, "calibration", 1)
        graph.calibration = spread_timesteps(example, t_name, count) if t_name else [example]
    keep_names = [k for k in recipe.keep if k not in SPECIAL]
    resolve_keep(graph, keep_names)  # raises RecipeError for an unknown layer name before any work
    if teacher is not None:  # a frozen copy: training passes move it and switch its gradients off
        teacher = copy.deepcopy(check_model(teacher, example_inputs)).eval().requires_grad_(False)
    context = PassContext(training_data=training_data, checkpoint_dir=checkpoint_dir, resume=resume, teacher=teacher)
    new_graph, report = Pipeline(recipe.passes(), verify=verify).run(graph, context)
    summary = {"recipe": recipe.name, "weights_only_bits": weights_only_bits(new_graph),
               "model_params": sum(p.numel() for p in model.parameters())}
    if verify:  # the Pipeline measured each transform against the original; the last one is the result
        errors = [p.rel_error for p in report.passes if p.rel_error is not None]
        summary["output_rel_error"] = errors[-1] if errors else 0.0
    return CompressResult(new_graph, recipe, report, summary)


def title(result: CompressResult) -> str:
    """Return a one-line description of a compression result for plots."""
    bits = result.summary.get("weights_only_bits", math.nan)
    return f"{result.summary.get('model', '')} {result.recipe.name}: {bits:.3f} bits on average"


def save(result: CompressResult | Graph, directory: str | Path, overwrite: bool = False,
         plot: bool = True, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the artifact for `result` to `directory` atomically; return its size summary (`path`, `bytes`).

    `summary` is stored for a Graph (a CompressResult brings its own), e.g. the one of the artifact it came
    from. Raises ArtifactError if the directory exists (unless `overwrite`); nothing is left behind on failure.
    """
    graph = result.graph if isinstance(result, CompressResult) else result
    codec = getattr(result.recipe, "codec", "rans") if isinstance(result, CompressResult) else "rans"
    payload, tensors = artifact_contents(graph, codec)
    if isinstance(result, CompressResult):
        payload["recipe"] = {"name": result.recipe.name, **asdict(result.recipe)}
        payload["report"] = result.report.to_json()
        payload["summary"] = result.summary
    elif summary:
        payload["summary"] = summary
    extra = None
    if plot and isinstance(result, CompressResult):
        extra = {"bits_per_layer.png": bits_per_layer_png(result.graph, title(result))}
    path = write_artifact(directory, payload, tensors, extra, overwrite=overwrite)
    total_params = result.summary.get("model_params") if isinstance(result, CompressResult) else None
    total_params = total_params or sum(p.numel() for p in graph.module.parameters()) + sum(
        m.weight_shape[0] * m.cols for m in graph.module.modules() if hasattr(m, "packed"))
    size = artifact_bytes(path)
    return {"path": str(path), "bytes": size, "artifact_bits_per_param": size * 8 / max(total_params, 1),
            "total_params": total_params}


def load(directory: str | Path, model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Return the runnable compressed model of an artifact (see backends.torch_load.load)."""
    return _load(directory, model)


def load_trainable(directory: str | Path, model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Return an artifact's model with its packed low-bit layers as fake-quant layers at the stored weights
    and scales, ready to train (freezing them again untrained gives the same codes)."""
    loaded = _load(directory, model)
    unfreeze(loaded)
    return loaded


__all__ = ["CompressResult", "RecipeError", "compress", "load", "load_trainable", "save"]
