"""Control branches: initialised from diffusers' ControlNetModel they match diffusers' own ControlNet + UNet
call; zero-initialised they change nothing; scale 0 and stripping give the plain UNet exactly; artifacts keep
them; bad models and control maps are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import ControlNetModel

import fxpress
from fxpress.errors import ModelError, PassError
from fxpress.frontends import zoo
from fxpress.frontends.capture import capture
from fxpress.ir.graph import Inputs
from fxpress.passes.pipeline import Pipeline
from fxpress.passes.rewire.branches import BRANCH_META, registry, set_branch_scale
from fxpress.passes.rewire.control import AttachControlBranch
from fxpress.passes.rewire.strip import StripBranches

ZERO_CONVS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
EMBEDDING = (16, 32)  # one stride-2 stage: the control map is twice the latent size


def first(out):
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)



def trained_controlnet(model, seed: int = 0) -> ControlNetModel:
    """diffusers' ControlNetModel from `model`, its zero convs given values as training would."""
    controlnet = ControlNetModel.from_unet(model, conditioning_embedding_out_channels=EMBEDDING).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(ZERO_CONVS):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return controlnet


def control_map(example, seed: int = 1) -> torch.Tensor:
    n, _, h, w = example.kwargs["sample"].shape
    return torch.rand(n, 3, 2 * h, 2 * w, generator=torch.Generator().manual_seed(seed))


def test_a_branch_from_diffusers_controlnet_matches_diffusers_own_call(tiny_unet):
    model, example = tiny_unet
    controlnet = trained_controlnet(model)
    control = control_map(example)
    kw = example.kwargs
    with torch.no_grad():
        down, mid = controlnet(kw["sample"], kw["timestep"], kw["encoder_hidden_states"], controlnet_cond=control,
                               return_dict=False)
        expected = first(model(**kw, down_block_additional_residuals=down, mid_block_additional_residual=mid))
    graph = capture(copy.deepcopy(model), example.args, example.kwargs)
    attached, _ = Pipeline([AttachControlBranch(controlnet=controlnet)]).run(graph)
    assert "control" in attached.input_names
    out = first(attached.run(Inputs((), {**kw, "control": control})))
    print(f"max difference to diffusers' ControlNet + UNet: {float((out - expected).abs().max()):.2e}")
    assert float((out - expected).abs().max()) <= 1e-5
    marked = {n.meta.get(BRANCH_META) for n in attached.graph_module.graph.nodes}
    assert "control" in marked


def test_zero_init_scale_zero_and_strip_give_the_plain_unet(tiny_unet, tmp_path):
    model, example = tiny_unet
    graph = capture(copy.deepcopy(model), example.args, example.kwargs)
    plain = first(graph.run())
    attached, report = Pipeline([AttachControlBranch(embedding_channels=EMBEDDING, role="train_only")],
                                verify=Inputs((), {**example.kwargs})).run(graph)
    with_map = Inputs((), {**example.kwargs, "control": control_map(example)})
    assert torch.equal(first(attached.run(with_map)), plain)  # zero convs: no change yet
    with torch.no_grad():
        for name, p in attached.module.controlnet.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                p.normal_(0, 0.05)
    assert not torch.equal(first(attached.run(with_map)), plain)
    path = fxpress.save(attached, tmp_path / "controlled")["path"]
    loaded = fxpress.load(path)
    assert torch.equal(first(loaded(**with_map.kwargs)), first(attached.run(with_map)))
    set_branch_scale(attached, "control", 0.0)
    assert torch.equal(first(attached.run(with_map)), plain)
    stripped, _ = Pipeline([StripBranches()]).run(attached)
    assert "control" not in stripped.input_names and "control" not in stripped.example.kwargs
    assert torch.equal(first(stripped.run()), plain)
    assert not any("controlnet" in n for n, _ in stripped.module.named_parameters())
    assert set(stripped.layers) == set(graph.layers)  # every layer back at its own path


@pytest.mark.parametrize("name", ["dit-s", "testbed-digits-dit"])
def test_a_transformer_control_branch_is_exact_at_insertion_scale_zero_and_strip(name, tmp_path):
    entry = zoo.get(name)
    example = entry.example_inputs()
    graph = capture(entry.build(), example.args, example.kwargs)
    plain = first(graph.run())
    attached, report = Pipeline([AttachControlBranch(blocks=2)],
                                verify=Inputs(example.args, dict(example.kwargs))).run(graph)
    details = report.passes[0].details
    assert details["blocks"] == 2 and details["embedding"]
    sample_name = attached.input_names[0]
    control = torch.randn(attached.example.kwargs[sample_name].shape, generator=torch.Generator().manual_seed(3))
    with_map = Inputs((), {**attached.example.kwargs, "control": control})
    assert torch.equal(first(attached.run(with_map)), plain)  # zero projections: no change yet
    with torch.no_grad():
        for n, p in attached.module.named_parameters():
            if n.startswith("zero_in") or ".zero_out." in n:
                p.normal_(0, 0.05)
    trained = first(attached.run(with_map))
    assert not torch.equal(trained, plain)
    loaded = fxpress.load(fxpress.save(attached, tmp_path / "controlled")["path"])
    assert torch.equal(first(loaded(**with_map.kwargs)), trained)
    set_branch_scale(attached, "control", 0.0)
    assert torch.equal(first(attached.run(with_map)), plain)
    stripped, _ = Pipeline([StripBranches(role="adapter")]).run(attached)
    assert "control" not in stripped.input_names and set(stripped.layers) == set(graph.layers)
    assert torch.equal(first(stripped.run()), plain)


def test_bad_models_and_control_maps_are_refused(tiny_unet):
    model, example = tiny_unet
    graph = capture(copy.deepcopy(model), example.args, example.kwargs)
    attached, _ = Pipeline([AttachControlBranch(embedding_channels=EMBEDDING)]).run(graph)
    wrong = torch.zeros(2, 3, 16, 16)
    message = r"control input 'control' has shape \(2, 3, 16, 16\); .* takes \(2, 3, 32, 32\)"
    with pytest.raises(ModelError, match=message):
        attached.module(**example.kwargs, control=wrong)
    clip = zoo.get("clip-text")
    text_graph = capture(clip.build(), clip.example_inputs().args, clip.example_inputs().kwargs)
    with pytest.raises(PassError, match="takes no control residuals and has no list of transformer blocks"):
        Pipeline([AttachControlBranch()]).run(text_graph)
    assert registry(graph) == {} and "control" not in graph.example.kwargs  # the input graph is untouched
