"""`PassContext`: what training passes need besides the Graph: data, a teacher, other pipeline components."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fxpress.errors import PassError
from fxpress.training.diffusion_data import DiffusionData


@dataclass
class PassContext:
    """Shared by every pass of one Pipeline run, never copied and never saved.

    `training_data` is what training passes learn from; `teacher` the frozen model they distil from
    (by default the Pipeline's input model, as it was before any pass ran); `components` other parts of
    the user's pipeline (a text encoder, a tokenizer, a scheduler) by name; `checkpoint_dir` and `resume`
    let a long training pass be interrupted and continued.
    """

    training_data: DiffusionData | None = None
    teacher: nn.Module | None = None
    components: dict[str, Any] = field(default_factory=dict)
    checkpoint_dir: str | Path | None = None
    resume: bool = False

    def require_data(self, pass_name: str, why: str = "training") -> DiffusionData:
        """Return the training data, or raise PassError saying how to give it."""
        if self.training_data is None:
            raise PassError(f"{why} needs training data: pass training_data= (a DiffusionData) to "
                            "fxpress.compress or fxpress.distill, or use a testbed model", pass_name)
        return self.training_data

    def require_teacher(self, pass_name: str) -> nn.Module:
        """Return the teacher, or raise PassError."""
        if self.teacher is None:
            raise PassError("this pass distils from a teacher, and the context has none", pass_name)
        return self.teacher

    def checkpoint_for(self, pass_name: str) -> Path | None:
        """Return the checkpoint folder of one pass (a subfolder named after it), or None."""
        return None if self.checkpoint_dir is None else Path(self.checkpoint_dir) / pass_name
