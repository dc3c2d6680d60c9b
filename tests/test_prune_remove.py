"""Physical removal keeps diffusers models whole: pruned forward == masked forward, and it recaptures."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from fxpress.errors import PassError
from fxpress.frontends.capture import capture
from fxpress.ir.blocks import block_units
from fxpress.ir.dependency import dependency_groups
from fxpress.ir.graph import output_tensors
from fxpress.passes.prune.bypass import bypass_blocks, bypass_hooks, find_stream_args
from fxpress.passes.prune.remove import check_removal, mask_units, remove_units
from fxpress.passes.prune.validate import validate_groups


def _model(name: str):
    """An untrained testbed denoiser with every weight drawn at random (diffusers zero-inits some)."""
    from fxpress.testbed import build_testbed
    from fxpress.testbed.training_data import noisy_inputs

    testbed = build_testbed(name)
    model = testbed.denoiser.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, noisy_inputs(testbed, [100, 700], 0)


@pytest.fixture(scope="module", params=["digits-dit", "digits"])
def validated(request):
    model, inputs = _model(request.param)
    graph = capture(model, (), inputs[0])
    return model, inputs, validate_groups(model, dependency_groups(graph), inputs)


def test_removing_a_third_of_every_family_equals_masking(validated):
    model, inputs, groups = validated
    rng = random.Random(0)
    removals = [(f, rng.sample(f.units, max(1, len(f.units) // 3))) for f in groups.families]
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    remove_units(pruned, removals)
    mask_units(masked, [u for _, units in removals for u in units])
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    assert check_removal(pruned, masked, inputs) < 1e-5
    graph = capture(pruned, (), inputs[0])  # the pruned diffusers model still captures ...
    with torch.no_grad():  # ... and its own forward matches the pruned graph
        assert torch.allclose(output_tensors(pruned(**inputs[1]))[0], _run_graph(graph, inputs[1]), atol=1e-6)


def _run_graph(graph, kwargs: dict) -> torch.Tensor:
    """Run the captured FX graph itself (parameters and buffers fed as its lifted inputs)."""
    tensors = {**dict(graph.module.named_parameters()), **dict(graph.module.named_buffers())}
    names = {**graph.param_names, **graph.buffer_names}
    placeholders = [n.name for n in graph.graph_module.graph.nodes if n.op == "placeholder"]
    args = [kwargs[n] if n in graph.input_names else tensors[names[n]] for n in placeholders]
    return output_tensors(graph.graph_module(*args))[0]


def test_attributes_follow_the_weights():
    model, inputs = _model("digits")
    graph = capture(model, (), inputs[0])
    groups = dependency_groups(graph)
    heads = groups.family("heads of mid_block.attentions.0.transformer_blocks.0.attn1")
    norm_groups = groups.family("mid_block.resnets.0.conv1 + mid_block.resnets.0.time_emb_proj")
    remove_units(model, [(heads, heads.units[:3]), (norm_groups, norm_groups.units[:5])])
    attn = model.mid_block.attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 5 and attn.to_q.out_features == 5 * 8 and attn.to_out[0].in_features == 40
    norm2 = model.mid_block.resnets[0].norm2
    assert (norm2.num_groups, norm2.num_channels) == (11, 44) and model.mid_block.resnets[0].conv1.out_channels == 44
    model(**inputs[0])


def test_coupling_hidden_in_python_code_is_found_and_refused():
    """PixArt views the caption projection to the image tokens' width: the graph cannot see it; a trial can."""
    model, inputs = _model("digits-dit")
    groups = validate_groups(model, dependency_groups(capture(model, (), inputs[0])), inputs)
    reason = groups.refused["caption_projection.linear_2"]
    assert "breaks the model" in reason and "pixart_transformer_2d.py" in reason
    assert "caption_projection.linear_1" in [f.name for f in groups.families]


def test_removing_every_channel_is_refused():
    model, inputs = _model("digits-dit")
    family = dependency_groups(capture(model, (), inputs[0])).family("heads of transformer_blocks.0.attn1")
    with pytest.raises(PassError, match="no channel"):
        remove_units(model, [(family, family.units)])


def test_bypassed_blocks_equal_hooked_blocks_and_drop_their_parameters():
    model, inputs = _model("digits-dit")
    graph = capture(model, (), inputs[0])
    paths = [b.path for b in block_units(graph).blocks][1::2]  # blocks 1, 3, 5
    streams, refused = find_stream_args(model, paths, inputs[0])
    assert streams["transformer_blocks.1"].position == 0 and not refused
    hooked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    handles = bypass_hooks(hooked, streams)
    removed = bypass_blocks(pruned, streams)
    assert removed == 3 * sum(p.numel() for p in model.transformer_blocks[0].parameters())
    with torch.no_grad():
        assert torch.equal(pruned(**inputs[1]).sample, hooked(**inputs[1]).sample)
    for handle in handles:
        handle.remove()
    capture(pruned, (), inputs[0])
