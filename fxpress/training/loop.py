"""`train_loop`: the optimizer loop shared by testbed training and QAT, with progress and resume."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from fxpress.errors import TrainingError
from fxpress.output import quiet as quiet_output
from fxpress.training.checkpoint import load_checkpoint, save_checkpoint
from fxpress.training.distributed import Distributed


def step_generator(seed: int, step: int) -> torch.Generator:
    """Return the generator every rank uses for the global batch of `step` (same on all ranks)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train_loop(loss_fn: Callable[[int], torch.Tensor], optimizer: torch.optim.Optimizer, steps: int,
               ctx: Distributed, checkpoint_modules: dict[str, nn.Module], *,
               after_step: Callable[[int], None] | None = None, checkpoint_dir: str | Path | None = None,
               checkpoint_every: int = 0, resume: bool = False, description: str = "training",
               max_grad_norm: float | None = 1.0) -> list[float]:
    """Run `steps` optimizer steps of `loss_fn(step)` and return the loss of each step (mean over ranks).

    `after_step(step)` runs after each update (e.g. an EMA). With `checkpoint_dir`, the main rank
    writes a checkpoint every `checkpoint_every` steps and at the end; `resume` continues from it.
    Raises TrainingError when the loss stops being finite.
    """
    start = 0
    if resume and checkpoint_dir is not None and Path(checkpoint_dir).exists():
        start = int(load_checkpoint(checkpoint_dir, checkpoint_modules, optimizer)["step"])
    losses: list[float] = []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    quiet = quiet_output() or not ctx.is_main
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    began = time.perf_counter()
    with Progress(*columns, console=Console(stderr=True), disable=quiet) as bar:
        task = bar.add_task(description, total=steps, completed=start, loss="")
        for step in range(start, steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(step)
            value = ctx.mean(float(loss.detach()))
            if not math.isfinite(value):  # before the update: a NaN step must not reach the weights
                raise TrainingError(f"{description}: loss became {value} at step {step}")
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            if after_step is not None:
                after_step(step)
            losses.append(value)
            bar.update(task, advance=1, loss=f"loss {value:.4f}")
            done = step + 1
            if checkpoint_dir is not None and (done == steps or checkpoint_every and done % checkpoint_every == 0):
                if ctx.is_main:
                    save_checkpoint(checkpoint_dir, done, checkpoint_modules, optimizer,
                                    {"seconds": time.perf_counter() - began})
                ctx.barrier()
    return losses


class EMA(nn.Module):
    """An exponential moving average of a module's floating-point parameters (kept as buffers)."""

    def __init__(self, module: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.is_floating_point()]
        for i, name in enumerate(self.names):
            self.register_buffer(f"p{i}", dict(module.named_parameters())[name].detach().clone())

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Move the average toward `module`'s parameters (warm-up: decay min(d, (1+step)/(10+step)))."""
        decay = min(self.decay, (1 + step) / (10 + step))
        params = dict(module.named_parameters())
        for i, name in enumerate(self.names):
            getattr(self, f"p{i}").lerp_(params[name].detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged parameters into `module`."""
        params = dict(module.named_parameters())
        for i, name in enumerate(self.names):
            params[name].copy_(getattr(self, f"p{i}"))
