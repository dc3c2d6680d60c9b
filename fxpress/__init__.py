"""fxpress: a compiler-style compression toolkit for diffusion models."""

from fxpress.output import quiet_third_party

quiet_third_party()  # before anything imports diffusers (see fxpress.output)

# ruff: noqa: E402

from fxpress.api import CompressResult, compress, load, load_trainable, save
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
from fxpress.ir.sampler import SamplerSpec
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.context import PassContext
from fxpress.passes.distill.config import DistillConfig
from fxpress.passes.pipeline import Pipeline
from fxpress.passes.quant.qat_config import QATConfig
from fxpress.recipes import BitsFusionRecipe, DistillRecipe, UniformRecipe, make_recipe
from fxpress.training.diffusion_data import DiffusionData

__all__ = [
    "AllocationError", "ArtifactError", "BitsFusionRecipe", "CaptureError", "CompressResult", "DiffusionData",
    "DistillConfig", "DistillRecipe", "FxpressError", "Graph", "Inputs", "LoweringError", "ModelError",
    "ModelSourceError", "Pass", "PassContext", "PassError", "PassResult", "Pipeline", "PipelineOrderError",
    "QATConfig", "RecipeError", "SamplerSpec", "TrainingError", "UniformRecipe", "capture", "compress", "load",
    "load_pipeline", "load_trainable", "make_recipe", "save",
]
