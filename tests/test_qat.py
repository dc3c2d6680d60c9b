"""Fake quantization, LSQ gradients, timestep sampling and the QAT passes (insert, train, freeze)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxpress.errors import PassError, RecipeError
from fxpress.ir.annotations import QuantSpec
from fxpress.passes.distill.features import block_modules
from fxpress.passes.quant.fake_quant import fake_quant_module, lsq_scales
from fxpress.passes.quant.qat import draw_timesteps
from fxpress.passes.quant.qat_config import QATConfig
from fxpress.passes.quant.scale_init import fit_scales


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("key", ["b1", "b2", "p2", "b3"])
def test_frozen_codes_reproduce_the_fake_quant_forward(kind, key):
    torch.manual_seed(0)
    spec = QuantSpec.from_key(key)
    layer = nn.Linear(24, 8) if kind == "linear" else nn.Conv2d(4, 6, 3, padding=1)
    scale = fit_scales(layer.weight.detach().reshape(layer.weight.shape[0], -1), spec)
    fake = fake_quant_module(layer, spec, scale.float())
    x = torch.randn(2, 24) if kind == "linear" else torch.randn(2, 4, 5, 5)
    codes, stored = fake.frozen()
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax and stored.dtype == torch.float16
    weight = (codes.float() * stored.float().unsqueeze(1)).reshape(layer.weight.shape)
    expected = (nn.functional.linear(x, weight, fake.bias) if kind == "linear"
                else nn.functional.conv2d(x, weight, fake.bias, padding=1))
    assert torch.equal(fake(x), expected)


def test_lsq_gradients_reach_scales_and_weights():
    torch.manual_seed(0)
    spec = QuantSpec(2, "balanced")
    layer = nn.Linear(16, 4)
    fake = fake_quant_module(layer, spec, lsq_scales(layer.weight.detach(), spec))
    fake(torch.randn(8, 16)).square().sum().backward()
    assert fake.log_scale.grad is not None and fake.log_scale.grad.abs().sum() > 0
    inside = (fake.weight.detach() / fake.effective_scale().detach().unsqueeze(1)).abs() < spec.qmax
    assert (fake.weight.grad[inside] != 0).float().mean() > 0.9  # straight-through inside the clip range
    assert torch.all(fake.weight.grad[~inside] == 0)  # clipped weights get no gradient


def test_beta_timesteps_favour_the_noisy_end_and_are_reproducible():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    t = draw_timesteps(gen(), 20000, 1000, "beta", (3.0, 1.0))
    assert t.min() >= 0 and t.max() <= 999
    assert abs(t.float().mean().item() / 1000 - 0.75) < 0.01  # Beta(3, 1) has mean 3/4
    assert torch.equal(t, draw_timesteps(gen(), 20000, 1000, "beta", (3.0, 1.0)))
    u = draw_timesteps(gen(), 20000, 1000, "uniform", (3.0, 1.0))
    assert abs(u.float().mean().item() / 1000 - 0.5) < 0.01


def test_block_modules_are_the_unet_blocks(tiny_unet):
    model, _ = tiny_unet
    assert list(block_modules(model)) == ["down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1",
                                          "mid_block"]


@pytest.mark.parametrize("bad", [{"stage1_steps": 0, "stage2_steps": 0}, {"timesteps": "normal"},
                                 {"guidance": [5.0, 1.0]}, {"beta": [3.0]}, {"scale_init": "x"}, {"steps": 3}])
def test_bad_qat_settings_are_refused(bad):
    from fxpress.recipes import make_recipe

    with pytest.raises(RecipeError):
        make_recipe("bitsfusion", qat=bad)


def test_qat_without_training_data_is_refused(tiny_unet):
    import fxpress

    model, example = tiny_unet
    with pytest.raises(RecipeError, match="training_data"):
        fxpress.compress(model, example, "uniform", qat={"stage1_steps": 1, "stage2_steps": 0})


@pytest.mark.parametrize("name", ["testbed-digits-unet", "testbed-digits-dit"])
def test_qat_pass_trains_and_freezes_exactly(tmp_path, name):
    """Two-stage QAT on a trained testbed UNet or DiT: the packed model equals the fake-quant one."""
    import fxpress
    from fxpress.frontends import zoo

    entry = zoo.get(name)
    model, example = entry.build(), entry.example_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qat = QATConfig(stage1_steps=6, stage2_steps=2, batch=8, lr=1e-4, scale_lr=1e-3)
    result = fxpress.compress(model, example, "uniform", bits=2, grid="balanced", scale_init="als", qat=qat,
                              training_data=entry.training_data())
    details = {p.name: p.details for p in result.report.passes}
    assert details["FreezeQuantized"]["freeze_rel_error"] == 0.0
    trained = details["TrainQuantized"]
    assert set(trained) >= {"stage1", "stage2"} and trained["stage1"]["steps"] == 6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    fxpress.save(result, tmp_path / "qat", plot=False)
    loaded = fxpress.load(tmp_path / "qat")
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(**example.kwargs).sample, result.model(**example.kwargs).sample)


def test_pass_without_data_names_itself(tiny_unet):
    from fxpress.frontends.capture import capture
    from fxpress.passes.pipeline import Pipeline
    from fxpress.passes.quant.assign_uniform import AssignUniform
    from fxpress.passes.quant.qat import qat_passes
    from fxpress.passes.quant.select_layers import SelectLayers

    model, example = tiny_unet
    graph = capture(model, example.args, example.kwargs)
    passes = [SelectLayers(["first", "last"]), AssignUniform(QuantSpec(2)), *qat_passes(QATConfig())]
    with pytest.raises(PassError, match="TrainQuantized.*training data|training data.*TrainQuantized"):
        Pipeline(passes).run(graph)


def test_cli_qat_needs_a_testbed_model_and_two_step_counts(tmp_path):
    from fxpress.cli import main

    assert main(["compress", "tiny-unet", "--qat", "3,1", "--out", str(tmp_path / "a")]) == 2
    assert main(["compress", "testbed-digits-unet", "--qat", "three", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
