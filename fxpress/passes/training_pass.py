"""`TrainingPass` and `train_student`: the one way passes train (QAT, KD recovery, step distillation).

A training pass differs from another in its loss and its trainable set only: this module owns the rest
(processes and devices from torchrun's environment, DDP, AdamW with optional warm-up, the shared
`train_loop` with progress, resume and the finite-loss check, putting models back where they were).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fxpress.ir.graph import Graph
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.context import PassContext
from fxpress.training.distributed import Distributed, unwrap
from fxpress.training.loop import train_loop

LossFactory = Callable[[nn.Module, Distributed], Callable[[int], torch.Tensor]]


def _device_of(module: nn.Module) -> torch.device:
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def summarize_losses(losses: list[float]) -> dict[str, float]:
    """Return the mean loss over the first and the last quarter of a run (at most 50 steps each)."""
    if not losses:
        return {}
    window = max(1, min(50, len(losses) // 4))
    return {"loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window}


def train_student(student: nn.Module, make_loss: LossFactory, steps: int, param_groups: list[dict[str, Any]], *,
                  frozen: Iterable[nn.Module] = (), description: str = "training", warmup: int = 0,
                  checkpoint_dir: str | Path | None = None, resume: bool = False, checkpoint_every: int = 0,
                  extra_modules: dict[str, nn.Module] | None = None,
                  after_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train the parameters in `param_groups` (AdamW groups; the rest of `student` stays fixed) for `steps`
    steps of the loss `make_loss(model, ctx)` returns, in one process or under torchrun; return a report
    (steps, seconds, world size, first/last losses, the loss of every step).

    `model` is `student` on this process's device (inside DDP with several processes); `frozen` modules
    (teachers) move to that device for the run. Every module goes back to its device afterwards and
    `student` to eval mode. `extra_modules` (e.g. discriminator heads) are checkpointed with the student.
    Raises TrainingError when the loss stops being finite.
    """
    ctx = Distributed.from_env()
    frozen = list(frozen)
    homes = [(m, _device_of(m)) for m in (student, *frozen, *(extra_modules or {}).values())]
    trainable = {id(p) for group in param_groups for p in group["params"]}
    for p in student.parameters():
        p.requires_grad_(id(p) in trainable)
    for module in frozen:
        module.eval().requires_grad_(False).to(ctx.device)
    for module in (extra_modules or {}).values():
        module.to(ctx.device)
        if ctx.world > 1:  # trained beside the DDP-wrapped student: average their gradients over ranks too
            for p in module.parameters():
                if p.requires_grad:
                    p.register_hook(lambda grad: ctx.average(grad))
    student.train()
    model = ctx.wrap(student)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    schedule = None
    if warmup > 0:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))

    def stepped(step: int) -> None:
        if schedule is not None:
            schedule.step()
        if after_step is not None:
            after_step(step)

    began = time.perf_counter()
    try:
        with torch.enable_grad():
            losses = train_loop(make_loss(model, ctx), optimizer, steps, ctx,
                                {"student": student, **(extra_modules or {})}, after_step=stepped,
                                checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                                resume=resume, description=description)
    finally:
        unwrap(model)
        student.eval().requires_grad_(False)
        for module, device in homes:
            module.to(device)
    return {"steps": steps, "seconds": round(time.perf_counter() - began, 1), "world_size": ctx.world,
            **summarize_losses(losses), "losses": losses}


class TrainingPass(Pass):
    """Base of passes that train: they run with the Pipeline's `PassContext` (data, teacher, components).

    Subclasses implement `train(graph, context)`; `fit(...)` is `train_student`, with the context's
    checkpoint folder for this pass and its resume flag.
    """

    uses_context: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = True  # the Pipeline snapshots its input model as the context's teacher
    transforms = True

    def run(self, graph: Graph, context: PassContext | None = None) -> PassResult:
        """Train on `graph` with `context` (an empty context when None: passes needing data then say so)."""
        return self.train(graph, context if context is not None else PassContext())

    def train(self, graph: Graph, context: PassContext) -> PassResult:
        """Train the graph's model and return a PassResult."""
        raise NotImplementedError

    def fit(self, context: PassContext, student: nn.Module, make_loss: LossFactory, steps: int,
            param_groups: list[dict[str, Any]], *, stage: str = "", **options: Any) -> dict[str, Any]:
        """Run `train_student` for this pass (checkpoints under the context's folder, named by pass and stage)."""
        folder = context.checkpoint_for(self.name + (f"-{stage}" if stage else ""))
        options.setdefault("checkpoint_every", 100)
        report = train_student(student, make_loss, steps, param_groups, checkpoint_dir=folder,
                               resume=context.resume, **options)
        report.pop("losses")
        return report
