"""`Pipeline`: runs passes in order on a copy of a Graph, checks ordering, verifies numerics, reports."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console

from fxpress.errors import FxpressError, PassError, PipelineOrderError
from fxpress.ir.graph import Graph, Inputs, output_tensors
from fxpress.output import stderr_console
from fxpress.passes.base import Pass
from fxpress.passes.context import PassContext


@dataclass
class PassReport:
    """One line of the pipeline report."""

    name: str
    seconds: float
    modified: bool
    details: dict[str, Any] = field(default_factory=dict)
    rel_error: float | None = None


@dataclass
class PipelineReport:
    """Per-pass reports, in order."""

    passes: list[PassReport] = field(default_factory=list)

    def to_json(self, timings: bool = False) -> list[dict[str, Any]]:
        """Return a JSON-ready list of per-pass dicts; wall-clock figures only with `timings`.

        Times differ from run to run, so what is saved in an artifact leaves them out (see `is_wall_time`):
        the same model, recipe and seed then give a byte-identical artifact.
        """
        report = [vars(p) for p in self.passes]
        return report if timings else _without_wall_times(report)


def is_wall_time(key: str) -> bool:
    """True for a report key that holds a measured time: 'seconds', '*_s', '*_seconds', 'measured_*'."""
    return key == "seconds" or key.endswith(("_s", "_seconds")) or key.startswith("measured_")


def _without_wall_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_wall_times(v) for k, v in value.items() if not is_wall_time(str(k))}
    if isinstance(value, list):
        return [_without_wall_times(v) for v in value]
    return value


def relative_error(reference: Any, candidate: Any) -> float:
    """Return ||candidate - reference|| / ||reference|| over all output tensors."""
    ref, cand = output_tensors(reference), output_tensors(candidate)
    num = sum(float((c.float() - r.float()).pow(2).sum()) for r, c in zip(ref, cand))
    den = sum(float(r.float().pow(2).sum()) for r in ref)
    return (num / max(den, 1e-30)) ** 0.5


class Pipeline:
    """An ordered list of passes.

    `run(graph)` checks up front that each pass's requirements are provided by the graph or by an
    earlier pass, runs them on a copy of `graph` (the caller's Graph and model never change, also
    when a pass raises), optionally verifies the model's output after each transforming pass, and
    returns (new_graph, report).
    """

    def __init__(self, passes: list[Pass], verify: bool | Inputs = False, console: Console | None = None,
                 max_rel_error: float | None = None):
        self.passes = list(passes)
        self.verify = verify
        self.console = console or stderr_console()
        self.max_rel_error = max_rel_error

    def check_order(self, graph: Graph) -> None:
        """Raise PipelineOrderError if some pass needs a fact nothing before it provides."""
        available = set(graph.provided)
        for index, p in enumerate(self.passes):
            missing = [r for r in p.requires if r not in available]
            if missing:
                raise PipelineOrderError(
                    f"pass #{index} {p.name} requires {missing}, which neither the graph nor an earlier "
                    f"pass provides (available: {sorted(available)})")
            available.update(p.provides)

    def run(self, graph: Graph, context: PassContext | None = None) -> tuple[Graph, PipelineReport]:
        """Run every pass on a copy of `graph`; raises PassError naming the failing pass.

        Passes that train (`uses_context`) get `context` (training data, teacher, components); when it
        names no teacher, they distil from a frozen copy of `graph`'s model as it is now.
        """
        self.check_order(graph)
        context = self._context(graph, context)
        work = graph.copy()
        report = PipelineReport()
        inputs = self.verify if isinstance(self.verify, Inputs) else work.example
        reference = work.run(inputs) if self.verify else None
        done: list[str] = []
        for p in self.passes:
            start = time.perf_counter()
            self.console.log(f"[bold]{p.name}[/bold] …")
            try:
                result = p.run(work, context) if getattr(p, "uses_context", False) else p.run(work)
            except FxpressError as exc:
                if isinstance(exc, PassError) and exc.pass_name:
                    raise
                raise PassError(f"{type(exc).__name__}: {exc}; passes done: {done}", p.name) from exc
            except Exception as exc:
                raise PassError(f"{type(exc).__name__}: {exc}; passes done: {done}", p.name) from exc
            work = result.graph
            work.provided.update(p.provides)
            entry = PassReport(p.name, time.perf_counter() - start, result.modified, result.report)
            if self.verify and result.modified and p.transforms:
                with torch.no_grad():
                    entry.rel_error = relative_error(reference, work.run(inputs))
                if self.max_rel_error is not None and entry.rel_error > self.max_rel_error:
                    raise PassError(f"output relative error {entry.rel_error:.3g} exceeds "
                                    f"{self.max_rel_error:.3g}; passes done: {done}", p.name)
            report.passes.append(entry)
            done.append(p.name)
            self.console.log(f"{p.name} done in {entry.seconds:.1f} s"
                             + (f", rel. error {entry.rel_error:.3g}" if entry.rel_error is not None else ""))
        return work, report

    def _context(self, graph: Graph, context: PassContext | None) -> PassContext:
        context = PassContext() if context is None else copy.copy(context)
        if context.teacher is None and any(getattr(p, "needs_teacher", False) for p in self.passes):
            context.teacher = copy.deepcopy(graph.module).eval().requires_grad_(False)
        return context
