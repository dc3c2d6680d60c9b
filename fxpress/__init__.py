"""fxpress: a compiler-style compression toolkit for diffusion models."""

from fxpress.output import quiet_third_party

quiet_third_party()  # before anything imports diffusers (see fxpress.output)

# ruff: noqa: E402

from fxpress.api import CompressResult, compress, load, save
from fxpress.backends.pipeline import load_pipeline
from fxpress.errors import (
    AllocationError,
    ArtifactError,
    CaptureError,
    FxpressError,
    LoweringError,
    ModelError,
    ModelSourceError,
    PassError,
    PipelineOrderError,
    RecipeError,
    TrainingError,
)
from fxpress.frontends.capture import capture
from fxpress.ir.graph import Graph, Inputs
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.pipeline import Pipeline
from fxpress.passes.quant.qat_config import QATConfig
from fxpress.recipes import BitsFusionRecipe, UniformRecipe, make_recipe
from fxpress.training.diffusion_data import DiffusionData

__all__ = [
    "AllocationError", "ArtifactError", "BitsFusionRecipe", "CaptureError", "CompressResult", "DiffusionData",
    "FxpressError", "Graph", "Inputs", "LoweringError", "ModelError", "ModelSourceError", "Pass", "PassError",
    "PassResult", "Pipeline", "PipelineOrderError", "QATConfig", "RecipeError", "TrainingError", "UniformRecipe",
    "capture", "compress", "load", "load_pipeline", "make_recipe", "save",
]
