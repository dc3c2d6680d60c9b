"""`AssignUniform`: give every selected layer the same QuantSpec (the baseline to beat)."""

from __future__ import annotations

from fxpress.ir.annotations import QuantSpec
from fxpress.ir.graph import Graph
from fxpress.passes.base import Pass, PassResult
from fxpress.passes.quant.select_layers import selected_layers


class AssignUniform(Pass):
    """Annotate all selected layers with one `spec`; provides 'bits' like AllocateBits."""

    requires = ("selection",)
    provides = ("bits",)

    def __init__(self, spec: QuantSpec):
        self.spec = spec

    def run(self, graph: Graph) -> PassResult:
        paths = selected_layers(graph)
        for path in paths:
            graph.annotation(path).quant = self.spec
        return PassResult(graph, False, {"layers": len(paths), "spec": self.spec.key,
                                         "achieved_bits": round(self.spec.cost_bits, 4)})
