"""Pipeline ordering, copy semantics on failure, numeric verification, and a user-written pass."""

from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import PassError, PipelineOrderError
from fxpress.ir.graph import output_tensors
from fxpress.passes.quant.allocate_bits import AllocateBits
from fxpress.passes.quant.select_layers import SelectLayers


class ZeroFirstConv(fxpress.Pass):
    """A user pass: halve the first conv's weight by swapping in a new module."""

    transforms = True
    provides = ("halved",)

    def run(self, graph):
        path = next(p for p, layer in graph.layers.items() if layer.kind == "conv2d")
        old = graph.module.get_submodule(path)
        new = torch.nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
        with torch.no_grad():
            new.weight.copy_(old.weight * 0.5)
            new.bias.copy_(old.bias)
        parent, _, name = path.rpartition(".")
        setattr(graph.module.get_submodule(parent) if parent else graph.module, name, new)
        return fxpress.PassResult(graph, True, {"halved": path})


class Explodes(fxpress.Pass):
    def run(self, graph):
        for p in graph.module.parameters():
            p.data.mul_(0)  # vandalise the copy, then fail
        graph.annotation(next(iter(graph.layers))).keep_reason = "vandalised"
        raise RuntimeError("boom")


@pytest.fixture()
def graph(tiny_unet):
    model, example = tiny_unet
    return fxpress.capture(model, example.args, example.kwargs)


def test_order_is_checked_before_anything_runs(graph):
    with pytest.raises(PipelineOrderError, match="AllocateBits.*sensitivity"):
        fxpress.Pipeline([SelectLayers(), AllocateBits(2.0)]).run(graph)


def test_failing_pass_leaves_model_and_graph_untouched(tiny_unet, graph):
    model, example = tiny_unet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_before = output_tensors(graph.run())[0]
    with pytest.raises(PassError) as info:
        fxpress.Pipeline([ZeroFirstConv(), Explodes()]).run(graph)
    assert info.value.pass_name == "Explodes" and "ZeroFirstConv" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert graph.module is model
    assert all(a.keep_reason is None for a in graph.annotations().values())
    assert torch.equal(output_tensors(graph.run())[0], out_before)


def test_user_pass_runs_and_is_verified(graph):
    new, report = fxpress.Pipeline([ZeroFirstConv()], verify=True).run(graph)
    entry = report.passes[0]
    assert entry.modified and entry.details["halved"] == "conv_in"
    assert entry.rel_error is not None and entry.rel_error > 0
    assert new.module is not graph.module
    assert "halved" in new.provided and "halved" not in graph.provided


def test_max_rel_error_guard(graph):
    with pytest.raises(PassError, match="exceeds"):
        fxpress.Pipeline([ZeroFirstConv()], verify=True, max_rel_error=1e-9).run(graph)
