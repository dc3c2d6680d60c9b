"""Typed errors raised by fxpress; every one says what failed and where."""

from __future__ import annotations


class FxpressError(Exception):
    """Base class of every error fxpress raises on purpose."""


class CaptureError(FxpressError):
    """The model could not be captured into a Graph (names the module path and source line)."""


class PassError(FxpressError):
    """A pass failed; carries the pass name, and the node and module path where known."""

    def __init__(self, message: str, pass_name: str = "", node: str = "", module_path: str = ""):
        self.pass_name, self.node, self.module_path = pass_name, node, module_path
        where = ", ".join(
            f"{k} {v!r}" for k, v in (("pass", pass_name), ("node", node), ("module", module_path)) if v
        )
        super().__init__(f"{message} ({where})" if where else message)


class PipelineOrderError(FxpressError):
    """A pass needs an input that no earlier pass (nor the Graph) provides."""


class RecipeError(FxpressError):
    """A recipe or its arguments are invalid; raised before any work starts."""


class AllocationError(FxpressError):
    """No bit assignment meets the requested target."""


class ArtifactError(FxpressError):
    """An artifact directory is missing, corrupt, truncated, tampered with or unsupported."""


class LoweringError(FxpressError):
    """A backend cannot lower this model to the requested device (no device, no runtime, nothing to lower)."""


class LoweringWarning(UserWarning):
    """A layer keeps the torch reference path after lowering; the message names the layer and why."""


class ModelSourceError(FxpressError):
    """A model to compress (zoo name, model folder, pipeline component or factory) cannot be resolved or loaded."""


class ModelError(FxpressError):
    """The model or its example inputs cannot be compressed as given (NaN/Inf or meta weights, inputs that do not
    fit its forward); names the parameter, buffer or input."""


class TrainingError(FxpressError):
    """A training run (QAT, KD recovery) failed: its loss became NaN or Inf; names the run and the step."""
