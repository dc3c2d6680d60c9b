"""Adapter training: a LoRA learns a style shift on the digits UNet, stripping gives the base samples back
exactly, two torchrun processes train what one does, and bad settings are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import DDIMScheduler

import fxpress
from fxpress.errors import RecipeError
from fxpress.frontends import zoo
from fxpress.frontends.capture import capture
from fxpress.ir.sampler import SamplerSpec, sample
from fxpress.passes.context import PassContext
from fxpress.passes.pipeline import Pipeline
from fxpress.passes.rewire.branches import registry
from fxpress.passes.rewire.lora import InsertLoRA
from fxpress.passes.rewire.strip import StripBranches
from fxpress.passes.rewire.train import AdapterConfig, TrainBranches
from fxpress.recipes import make_recipe
from fxpress.testbed import digits as digit_set
from fxpress.testbed.models import load_testbed
from fxpress.testbed.sampling import training_scheduler
from fxpress.training.diffusion_data import DiffusionData


@pytest.fixture(scope="module")
def digits():
    entry = zoo.get("testbed-digits-unet")
    return entry.build(), entry.example_inputs(), entry.training_data()


def draw(model, seed: int = 0, count: int = 8) -> torch.Tensor:
    testbed = load_testbed("digits")
    scheduler = DDIMScheduler.from_config(training_scheduler().config, timestep_spacing="trailing",
                                          set_alpha_to_one=False)
    spec = SamplerSpec.from_scheduler(scheduler, 8, guidance_scale=testbed.spec.guidance)
    noise = torch.randn(count, 1, digit_set.SIZE, digit_set.SIZE, generator=torch.Generator().manual_seed(seed))
    cond = testbed.encode([digit_set.caption(i % 10) for i in range(count)])
    with torch.no_grad():
        return sample(spec, model, noise, cond, testbed.encode([""]).expand(count, -1, -1)).clamp(-1, 1)


def test_lora_learns_inverted_digits_and_stripping_returns_the_base_samples(digits):
    model, example, data = digits
    inverted = DiffusionData(-data.samples, data.conditions, data.unconditional, data.scheduler)
    graph = capture(copy.deepcopy(model), example.args, example.kwargs)
    base_samples = draw(graph.module)
    config = AdapterConfig(steps=80, batch=16, lr=3e-3, ema=0.9)
    trained, report = Pipeline([InsertLoRA(["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"], rank=4,
                                           name="inverse"),
                                TrainBranches(config)]).run(graph, PassContext(training_data=inverted))
    details = report.passes[1].details
    assert details["loss_last"] < details["loss_first"]
    styled = draw(trained.module)
    print(f"mean brightness: base {float(base_samples.mean()):.3f}, with the LoRA {float(styled.mean()):.3f}")
    assert float(styled.mean()) > float(base_samples.mean()) + 0.5  # dark digits on a light ground
    stripped, _ = Pipeline([StripBranches(role="adapter", names=["inverse"])]).run(trained)
    assert torch.equal(draw(stripped.module), base_samples)
    assert all(torch.equal(a, b) for a, b in zip(stripped.module.parameters(), graph.module.parameters()))


def test_adapter_recipe_trains_only_branches_unless_told(digits):
    model, example, data = digits
    frozen = {n: p.clone() for n, p in model.named_parameters()}
    recipe = make_recipe("adapter", lora=["to_q"], rank=2, train={"steps": 3, "batch": 4})
    result = fxpress.compress(model, example, recipe, training_data=data)
    after = dict(result.graph.module.named_parameters())
    for name, value in frozen.items():  # every base weight as it was; the user's model too
        moved = name.replace(".to_q.", ".to_q.base_layer.") if ".to_q." in name else name
        assert torch.equal(after[moved], value) and torch.equal(dict(model.named_parameters())[name], value)
    with_base = make_recipe("adapter", lora=["to_q"], rank=2, train={"steps": 3, "batch": 4,
                                                                      "also_train": ["conv_out"], "base_lr": 1e-2})
    moved = fxpress.compress(model, example, with_base, training_data=data).graph.module
    assert not torch.equal(moved.conv_out.weight, model.conv_out.weight)


def test_bad_adapter_settings_are_refused(digits, tiny_compressed):
    model, example, data = digits
    with pytest.raises(RecipeError, match="ema must be a decay"):
        make_recipe("adapter", train={"ema": 1.5})
    with pytest.raises(RecipeError, match="unknown adapter training field"):
        make_recipe("adapter", train={"stepz": 3})
    with pytest.raises(RecipeError, match="role must be"):
        make_recipe("adapter", role="sometimes")
    graph = capture(copy.deepcopy(model), example.args, example.kwargs)
    with pytest.raises(fxpress.errors.PassError, match="no branches to train"):
        Pipeline([TrainBranches(AdapterConfig(steps=1))]).run(graph, PassContext(training_data=data))
    low = Pipeline([InsertLoRA(["to_q"], rank=2)]).run(tiny_compressed.graph)[0]
    packed = next(p for p, m in low.module.named_modules() if type(m).__name__ == "LowBitConv2d")
    with pytest.raises(fxpress.errors.PassError, match="packed low-bit layers"):
        Pipeline([TrainBranches(AdapterConfig(steps=1, also_train=(f"re:{packed}",)))]).run(
            low, PassContext(training_data=data))
    assert registry(low)["lora"]["targets"]


def test_lora_training_under_torchrun_matches_one_process(tmp_path):
    recipe = tmp_path / "adapter.toml"
    recipe.write_text('recipe = "adapter"\nlora = ["to_q", "to_v"]\nrank = 4\n'
                      '[train]\nsteps = 3\nbatch = 8\nlr = 1e-3\nema = 0.5\n')
    from torchrun import one_and_two_processes

    one_and_two_processes(["compress", "testbed-digits-unet", "--recipe", str(recipe), "--no-verify"], tmp_path)
    one, two = fxpress.load(tmp_path / "one"), fxpress.load(tmp_path / "two")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    trained = next(p for p in manifest["report"] if p["name"] == "TrainBranches")["details"]
    assert trained["world_size"] == 2
    pairs = [(a.detach().double(), b.detach().double()) for (n, a), (_, b) in
             zip(one.named_parameters(), two.named_parameters()) if ".lora_" in n]
    assert pairs
    diff = sum(float((a - b).square().sum()) for a, b in pairs)
    norm = sum(float(a.square().sum()) for a, _ in pairs)
    print(f"relative L2 distance between the 1- and 2-process LoRA factors {(diff / norm) ** 0.5:.2e}")
    assert (diff / norm) ** 0.5 <= 1e-5


def test_low_bit_layers_pass_gradients_to_their_input(tiny_compressed):
    from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear

    modules = tiny_compressed.graph.module.named_modules()
    layers = {type(m): m for _, m in modules if isinstance(m, (LowBitLinear, LowBitConv2d))}
    gen = torch.Generator().manual_seed(0)
    for kind, layer in layers.items():
        dense = layer.to_dense()
        shape = (2, 5, layer.in_features) if kind is LowBitLinear else (2, layer.in_channels, 6, 6)
        x = torch.randn(shape, generator=gen)
        grads = []
        for module in (layer, dense):
            leaf = x.clone().requires_grad_(True)
            (module(leaf) * torch.linspace(-1, 1, module(leaf).numel()).view_as(module(leaf))).sum().backward()
            grads.append(leaf.grad)
        assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6), kind.__name__
    assert set(layers) == {LowBitLinear, LowBitConv2d}


def test_lora_trains_over_a_packed_low_bit_model(digits):
    model, example, data = digits
    low = fxpress.compress(model, example, "uniform", target_bits=4, training_data=None)
    config = AdapterConfig(steps=4, batch=8, lr=1e-2)
    trained, _ = Pipeline([InsertLoRA(["to_q", "conv1"], rank=2), TrainBranches(config)]).run(
        low.graph, PassContext(training_data=data))
    wrappers = [m for m in trained.module.modules() if type(m).__name__ == "LoRA"]
    assert any(type(w.base_layer).__name__.startswith("LowBit") for w in wrappers)
    assert all(float(w.lora_B.weight.abs().sum()) > 0 for w in wrappers)  # every branch got a gradient
