"""The `Pass` protocol: a small class with `run(graph) -> PassResult` and declared requires/provides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from fxpress.ir.graph import Graph


@dataclass
class PassResult:
    """What a pass returns: the graph, whether it changed the model, and a JSON-ready report."""

    graph: Graph
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of passes.

    Subclasses set `requires` (facts that must be in `graph.provided` before they run) and `provides`
    (facts they add), and implement `run`. A pass that changes the model sets `transforms = True`
    so the Pipeline can verify numerics after it. Passes change the Graph they are given; the
    Pipeline hands them a copy.
    """

    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    transforms: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def run(self, graph: Graph) -> PassResult:
        """Analyse or transform `graph` and return a PassResult."""
        raise NotImplementedError
