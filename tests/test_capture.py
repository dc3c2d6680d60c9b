"""Capture: the layer view of real diffusers/transformers models, and clear errors when capture fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpress
from fxpress.errors import CaptureError


def test_tiny_unet_layers(tiny_unet):
    model, example = tiny_unet
    graph = fxpress.capture(model, example.args, example.kwargs)
    layers = graph.layers
    assert list(layers)[0] == "time_embedding.linear_1" and list(layers)[-1] == "conv_out"
    q = layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert q.kind == "linear" and q.weight_shape == (64, 64) and q.flops == 2 * 2 * 256 * 64 * 64
    conv = layers["conv_in"]
    assert conv.kind == "conv2d" and conv.in_shape == (2, 4, 16, 16) and conv.out_shape == (2, 64, 16, 16)
    assert conv.params == 64 * 4 * 9 + 64
    expected = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(layers) == expected
    ann = graph.annotation("conv_in")
    assert all(n.meta["fxpress"] is ann for n in graph.nodes_of("conv_in"))


def test_profile_prints_every_layer(tiny_unet):
    from rich.console import Console

    model, example = tiny_unet
    console = Console(record=True, width=250)
    fxpress.capture(model, example.args, example.kwargs).profile(console)
    text = console.export_text()
    assert "conv_out" in text and "83 weight-bearing layers" in text


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.proj(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x
        return -x


def test_capture_error_names_module_and_line():
    model = DataDependent()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CaptureError) as info:
        fxpress.capture(model, (torch.randn(2, 4),))
    message = str(info.value)
    assert "'gate'" in message and "test_capture.py" in message and "x.sum() > 0" in message
    assert "Try:" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.gate._forward_pre_hooks and not model._forward_hooks


def test_capture_rejects_non_modules():
    with pytest.raises(CaptureError, match="nn.Module"):
        fxpress.capture(lambda x: x, (torch.randn(2),))


def test_clip_text_and_dit_capture():
    from fxpress.frontends import zoo

    for name, first in (("clip-text", "encoder.layers.0.self_attn.q_proj"),
                        ("dit-s", "pos_embed.proj")):
        entry = zoo.get(name)
        example = entry.example_inputs()
        graph = fxpress.capture(entry.build(), example.args, example.kwargs)
        assert any(path.endswith(first) for path in graph.layers)  # transformers 5 drops `text_model.`


def test_inputs_tile_to_a_batch_along_the_batch_axis_only():
    from fxpress.ir.graph import Inputs

    inputs = Inputs((), {"x": torch.arange(6.0).reshape(2, 3), "t": torch.tensor([5, 7]), "scale": torch.tensor(2.0),
                         "ids": torch.ones(4, 1)})
    assert inputs.batch_size == 2
    tiled = inputs.with_batch(5)
    assert tiled.batch_size == 5 and tiled.kwargs["t"].tolist() == [5, 7, 5, 7, 5]
    assert torch.equal(tiled.kwargs["x"][4], inputs.kwargs["x"][0])
    assert tiled.kwargs["scale"].dim() == 0 and tiled.kwargs["ids"].shape == (4, 1)  # not on the batch axis
    assert Inputs((), {"t": torch.tensor([1])}).batch_size is None
