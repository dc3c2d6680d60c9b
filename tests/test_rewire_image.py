"""Image adapters (decoupled cross-attention): bit-identical at insertion on a UNet and a PixArt DiT, a trained
adapter changes the output, scale 0 and strip give the plain model exactly, artifacts keep it, bad input refused."""

from __future__ import annotations

import copy

import pytest
import torch

import fxpress
from fxpress.errors import ModelError, PassError
from fxpress.frontends import zoo
from fxpress.frontends.capture import capture
from fxpress.ir.graph import Inputs
from fxpress.passes.pipeline import Pipeline
from fxpress.passes.rewire.branches import BRANCH_META, registry, set_branch_scale
from fxpress.passes.rewire.image_adapter import InsertImageAdapter
from fxpress.passes.rewire.strip import StripBranches


def first(out):
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


def captured(name: str):
    entry = zoo.get(name)
    model, example = entry.build(), entry.example_inputs()
    return capture(copy.deepcopy(model), example.args, example.kwargs)


@pytest.mark.parametrize("name", ["tiny-unet", "testbed-digits-dit"])
def test_image_adapter_is_exact_at_insertion_scale_zero_and_strip(name, tmp_path):
    graph = captured(name)
    plain = first(graph.run())
    adapted, report = Pipeline([InsertImageAdapter(features=32, tokens=4)],
                               verify=Inputs(graph.example.args, dict(graph.example.kwargs))).run(graph)
    assert report.passes[0].details["attentions"] > 0
    assert "image_embeds" in adapted.input_names
    assert torch.equal(first(adapted.run()), plain)  # with image features given: v_ip is zero
    with torch.no_grad():
        for m in adapted.module.modules():
            if hasattr(m, "to_v_ip"):
                m.to_v_ip.weight.normal_(0, 0.05)
    trained = first(adapted.run())
    assert not torch.equal(trained, plain)
    marked = [n for n in adapted.graph_module.graph.nodes if n.meta.get(BRANCH_META) == "image"]
    assert any(n.op == "call_function" for n in marked) and any(n.op == "placeholder" for n in marked)
    loaded = fxpress.load(fxpress.save(adapted, tmp_path / "adapted")["path"])
    assert torch.equal(first(loaded(*adapted.example.args, **adapted.example.kwargs)), trained)
    again = capture(loaded, adapted.example.args, adapted.example.kwargs)  # a loaded model saves again
    assert again.source == graph.source and list(registry(again)) == ["image"]
    reloaded = fxpress.load(fxpress.save(again, tmp_path / "again")["path"])
    assert torch.equal(first(reloaded(*adapted.example.args, **adapted.example.kwargs)), trained)
    set_branch_scale(adapted, "image", 0.0)
    assert torch.equal(first(adapted.run()), plain)
    stripped, _ = Pipeline([StripBranches(role="adapter")]).run(adapted)
    assert "image_embeds" not in stripped.input_names and set(stripped.layers) == set(graph.layers)
    assert torch.equal(first(stripped.run()), plain)
    assert registry(stripped) == {}


def test_an_image_encoder_takes_reference_images(tmp_path):
    graph = captured("tiny-unet")
    plain = first(graph.run())
    adapted, report = Pipeline([InsertImageAdapter(features=16, tokens=2, image_channels=3, image_size=16)]).run(graph)
    assert tuple(adapted.example.kwargs["image_embeds"].shape) == (2, 3, 16, 16)
    assert torch.equal(first(adapted.run()), plain)
    with torch.no_grad():
        for m in adapted.module.modules():
            if hasattr(m, "to_v_ip"):
                m.to_v_ip.weight.normal_(0, 0.05)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = {**adapted.example.kwargs, "image_embeds": images}
    other = {**kwargs, "image_embeds": images.flip(-1)}
    assert not torch.equal(first(adapted.module(**kwargs)), first(adapted.module(**other)))  # the image matters
    loaded = fxpress.load(fxpress.save(adapted, tmp_path / "adapted")["path"])
    assert torch.equal(first(loaded(**kwargs)), first(adapted.module(**kwargs)))
    with pytest.raises(ModelError, match=r"must be \(batch, 3, height, width\) images"):
        adapted.module(**{**kwargs, "image_embeds": torch.zeros(2, 16)})


def test_bad_image_input_and_models_without_cross_attention_are_refused():
    graph = captured("tiny-unet")
    adapted, _ = Pipeline([InsertImageAdapter(features=32)]).run(graph)
    kwargs = {**adapted.example.kwargs, "image_embeds": torch.zeros(2, 31)}
    with pytest.raises(ModelError, match=r"image input 'image_embeds' must be \(batch, 32\) image features"):
        adapted.module(**kwargs)
    with pytest.raises(PassError, match="has no cross-attention"):
        Pipeline([InsertImageAdapter(features=32)]).run(captured("dit-s"))
    with pytest.raises(PassError, match="image adapter target 'attn9' matches nothing"):
        Pipeline([InsertImageAdapter(features=32, targets=["attn9"])]).run(graph)
    assert "image_embeds" not in graph.example.kwargs and registry(graph) == {}


def test_control_lora_and_image_adapter_compose_and_strip_to_the_adapter(tmp_path):
    from fxpress.passes.rewire.control import AttachControlBranch
    from fxpress.passes.rewire.lora import InsertLoRA

    graph = captured("tiny-unet")
    plain = first(graph.run())
    built, _ = Pipeline([AttachControlBranch(embedding_channels=(16, 32), role="train_only", name="pose"),
                         InsertLoRA(["to_q", "to_k"], rank=2, name="light", role="train_only"),
                         InsertImageAdapter(features=16, name="identity")],
                        verify=Inputs(graph.example.args, dict(graph.example.kwargs))).run(graph)
    assert list(registry(built)) == ["pose", "light", "identity"]
    assert torch.equal(first(built.run()), plain)  # every branch starts at zero
    with torch.no_grad():
        for n, p in built.module.named_parameters():
            if "to_v_ip" in n or "lora_B" in n or "controlnet_down_blocks" in n or "controlnet_mid_block" in n:
                p.normal_(0, 0.05)
    n, _, h, w = built.example.kwargs["sample"].shape
    control = torch.rand(n, 3, 2 * h, 2 * w, generator=torch.Generator().manual_seed(0))
    inputs = Inputs((), {**built.example.kwargs, "control": control})
    everything = first(built.run(inputs))
    loaded = fxpress.load(fxpress.save(built, tmp_path / "all")["path"])
    assert torch.equal(first(loaded(**inputs.kwargs)), everything)
    for name in ("pose", "light"):
        set_branch_scale(built, name, 0.0)
    adapter_only = first(built.run(inputs))
    assert not torch.equal(adapter_only, plain) and not torch.equal(adapter_only, everything)
    stripped, _ = Pipeline([StripBranches()]).run(built)  # the train-only branches go, the adapter stays
    assert list(registry(stripped)) == ["identity"]
    assert "control" not in stripped.input_names and "image_embeds" in stripped.input_names
    assert torch.equal(first(stripped.run()), adapter_only)
    assert not any("controlnet" in k or "lora" in k for k, _ in stripped.module.named_parameters())
    reloaded = fxpress.load(fxpress.save(stripped, tmp_path / "adapter")["path"])
    assert torch.equal(first(reloaded(**stripped.example.kwargs)), adapter_only)
    with pytest.raises(fxpress.errors.RecipeError, match="image adapter already"):
        InsertImageAdapter(features=16, name="again").run(stripped)
