"""Dependency groups on captured diffusers graphs: heads, FFN channels, GroupNorm-coupled convs, skips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxpress.frontends.capture import capture
from fxpress.ir.dependency import dependency_groups


def _testbed_graph(name: str):
    from fxpress.testbed import build_testbed
    from fxpress.testbed.training_data import noisy_inputs

    testbed = build_testbed(name)
    return capture(testbed.denoiser.eval(), (), noisy_inputs(testbed, [500], 0)[0])


@pytest.fixture(scope="module")
def dit_groups():
    """The digits DiT (PixArt, 6 blocks, 4 heads of 24, FFN 384) and its dependency groups."""
    graph = _testbed_graph("digits-dit")
    return graph, dependency_groups(graph)


@pytest.fixture(scope="module")
def unet_groups():
    """The digits UNet (blocks 32/64, GroupNorm 16 groups, GEGLU FFN 256) and its dependency groups."""
    graph = _testbed_graph("digits")
    return graph, dependency_groups(graph)


def test_attention_heads_group_qkv_rows_with_output_columns(dit_groups):
    _, groups = dit_groups
    heads = groups.of_kind("head")
    assert len(heads) == 12 and all(len(f.units) == 4 for f in heads)  # self + cross attention in 6 blocks
    family = groups.family("heads of transformer_blocks.2.attn2")
    assert family.host == "transformer_blocks.2.attn2"
    for h, unit in enumerate(family.units):
        rows = tuple(range(24 * h, 24 * (h + 1)))
        for proj in ("to_q", "to_k", "to_v"):
            assert unit.slices[(f"transformer_blocks.2.attn2.{proj}.weight", 0)] == rows
            assert unit.slices[(f"transformer_blocks.2.attn2.{proj}.bias", 0)] == rows
        assert unit.slices[("transformer_blocks.2.attn2.to_out.0.weight", 1)] == rows
        assert len(unit.slices) == 7


def test_ffn_channels_pair_first_rows_with_second_columns(dit_groups):
    _, groups = dit_groups
    family = groups.family("transformer_blocks.4.ff.net.0.proj")
    assert family.kind == "channel" and len(family.units) == 384
    unit = family.units[17]
    assert unit.slices == {("transformer_blocks.4.ff.net.0.proj.bias", 0): (17,),
                           ("transformer_blocks.4.ff.net.0.proj.weight", 0): (17,),
                           ("transformer_blocks.4.ff.net.2.weight", 1): (17,)}


def test_gated_ffn_units_take_both_halves(unet_groups):
    """GEGLU: proj makes 2 x 256 channels, the gate multiplies half a by gelu(half b): channel i is rows i, i+256."""
    _, groups = unet_groups
    family = groups.family("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj")
    assert len(family.units) == 256
    unit = family.units[5]
    assert unit.slices[("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight", 0)] == (5, 261)
    assert unit.slices[("mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight", 1)] == (5,)


def test_resnet_inner_channels_move_by_groupnorm_groups(unet_groups):
    """conv1 rows, the time projection added to them, norm2's affine and conv2's columns: whole groups."""
    _, groups = unet_groups
    family = groups.family("down_blocks.1.resnets.0.conv1 + down_blocks.1.resnets.0.time_emb_proj")
    assert family.kind == "group" and len(family.units) == 16  # 64 channels, 16 groups of 4
    unit = family.units[3]
    rows = (12, 13, 14, 15)
    prefix = "down_blocks.1.resnets.0."
    assert unit.slices == {
        (prefix + "conv1.bias", 0): rows, (prefix + "conv1.weight", 0): rows,
        (prefix + "conv2.weight", 1): rows,
        (prefix + "norm2.bias", 0): rows, (prefix + "norm2.weight", 0): rows,
        (prefix + "time_emb_proj.bias", 0): rows, (prefix + "time_emb_proj.weight", 0): rows,
    }


def test_skip_connections_reach_the_concatenating_consumer(unet_groups):
    """The 32-channel stream of level 0 is concatenated after 64 upsampled channels in the up block:
    its units hold those up-block conv columns at offset 64, and the GroupNorm groups that straddle."""
    graph, groups = unet_groups
    stream = [f for f in groups.families if "down_blocks.0.resnets.0.conv2" in f.name]
    assert stream
    columns = set()
    for family in stream:
        for unit in family.units:
            assert unit.slices[("conv_in.weight", 0)] == unit.slices[("down_blocks.0.resnets.0.conv2.weight", 0)]
            for (name, dim), idx in unit.slices.items():
                if name == "up_blocks.1.resnets.1.conv1.weight" and dim == 1:
                    columns.update(idx)
    skip = graph.module.up_blocks[1].resnets[1].conv1.in_channels - 32
    assert set(range(skip, skip + 32)) <= columns  # every stream channel reaches the skip consumer


def test_refusals_name_their_reason(dit_groups, unet_groups):
    _, dit = dit_groups
    assert dit.refused["proj_out"] == "reaches the model output"
    assert "layer_norm" in dit.refused["transformer_blocks.0.ff.net.2"]  # the residual stream is normalised as one
    _, unet = unet_groups
    assert "layer_norm" in unet.refused["mid_block.attentions.0.proj_in"]
    assert not any(f.name.startswith("conv_out") for f in unet.families)


class _CumsumMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = torch.cumsum(torch.relu(self.a(x)), dim=-1)  # mixes channels in a way no rule covers
        return self.c(torch.relu(self.b(h)))


def test_an_op_it_cannot_follow_is_refused_not_guessed():
    graph = capture(_CumsumMixer(), (torch.randn(2, 8),))
    groups = dependency_groups(graph)
    assert "cumsum" in groups.refused["a"]
    assert groups.refused["c"] == "reaches the model output"
    assert [f.name for f in groups.families] == ["b"]  # b's 8 channels go through relu into c
    assert len(groups.family("b").units) == 8


def test_residual_blocks_can_be_bypassed(dit_groups, unet_groups):
    from fxpress.ir.blocks import block_units

    dit, _ = dit_groups
    blocks = block_units(dit)
    assert [b.path for b in blocks.blocks] == [f"transformer_blocks.{i}" for i in range(6)]
    assert blocks.blocks[1].stream_input == blocks.blocks[0].output  # each block feeds the next
    unet, _ = unet_groups
    found = block_units(unet)
    paths = [b.path for b in found.blocks]
    assert "mid_block.resnets.0" in paths and "mid_block.attentions.0" in paths
    assert "down_blocks.0.resnets.0" in paths  # 32 -> 32 channels: bypassable
    assert "matches 0 of its inputs" in found.refused["down_blocks.1.resnets.0"]  # 32 -> 64 channels: not
