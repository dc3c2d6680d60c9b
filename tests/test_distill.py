"""Step distillation: guidance input, progressive rounds, adversarial training, recipes, artifacts, CLI, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fxpress
from fxpress.errors import PassError, RecipeError
from fxpress.frontends import zoo
from fxpress.frontends.capture import capture
from fxpress.ir.graph import Inputs
from fxpress.ir.sampler import SamplerSpec, sample, trailing_timesteps
from fxpress.kernels.guidance import GuidanceConditioned
from fxpress.passes.context import PassContext
from fxpress.passes.distill.config import DistillConfig
from fxpress.passes.distill.guidance_input import guidance_site
from fxpress.passes.distill.progressive import ProgressiveDistill, two_step_target
from fxpress.passes.distill.sampler_specs import base_spec, grid_spec
from fxpress.passes.pipeline import Pipeline
from fxpress.training.diffusion_data import DiffusionData

TINY = {"train_steps": 2, "batch": 4}


@pytest.fixture(scope="module")
def digits():
    """(model, example, training data) of the trained digits UNet testbed."""
    entry = zoo.get("testbed-digits-unet")
    return entry.build(), entry.example_inputs(), entry.training_data()


@pytest.mark.parametrize("name, site", [("testbed-digits-unet", "time_embedding"),
                                        ("testbed-digits-dit", "adaln_single.emb")])
def test_guidance_input_at_zero_init_is_bit_identical(name, site):
    entry = zoo.get(name)
    model, example = entry.build(), entry.example_inputs()
    graph = capture(model, example.args, example.kwargs)
    found, width = guidance_site(graph)
    assert found == site  # found from data flow: the module every timestep-only result derives from
    wrapped = GuidanceConditioned(copy.deepcopy(model), found, width)
    w = torch.full((Inputs.of(example).batch_size,), 4.0)
    with torch.no_grad():
        ref = model(**example.kwargs)[0]
        assert torch.equal(wrapped(**example.kwargs, guidance=w)[0], ref)
        torch.nn.init.normal_(wrapped.embedding.linear_2.weight)  # once trained, w changes the output
        assert not torch.equal(wrapped(**example.kwargs, guidance=w)[0], ref)
    copied = copy.deepcopy(wrapped)
    assert copied._slot is copied.model.get_submodule(found).slot  # a copy routes w to its own embedding


def test_sampler_spec_equals_diffusers_ddim(digits):
    from diffusers import DDIMScheduler

    from fxpress.testbed.sampling import guided_noise, schedule

    model, _, data = digits
    cond, uncond = data.conditions[:2], data.unconditional
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for spacing, steps in (("leading", 10), ("trailing", 4)):
        scheduler = DDIMScheduler(**schedule(), clip_sample=True, set_alpha_to_one=False, timestep_spacing=spacing)
        scheduler.set_timesteps(steps)
        x = noise.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps = guided_noise(model, x, torch.full((2,), int(t)), cond, uncond, 1.5)
                x = scheduler.step(eps, t, x).prev_sample
            spec = SamplerSpec.from_scheduler(scheduler, steps, guidance_scale=1.5)
            assert float((sample(spec, model, noise, cond, uncond) - x).abs().max()) <= 1e-5


def test_trailing_grids_nest():
    for steps in (1, 2, 4, 8, 16, 32):
        coarse, fine = trailing_timesteps(1000, steps), trailing_timesteps(1000, steps * 2)
        assert coarse == fine[::2] and coarse[0] == 999


def _round_loss(student, teacher, teacher_spec, student_spec, data, seed=5):
    """The progressive objective on a fixed batch (every student step once per row group)."""
    gen = torch.Generator().manual_seed(seed)
    x0, cond = data.batch(gen, 16)
    noise = torch.randn(x0.shape, generator=gen)
    index = torch.arange(16) % student_spec.steps
    t = torch.tensor(student_spec.timesteps)[index]
    mid = torch.tensor(teacher_spec.timesteps[1::2])[index]
    prev = torch.tensor(student_spec.prev_timesteps)[index]
    x = data.add_noise(x0, noise, t)
    w = torch.full((16,), 1.5)
    with torch.no_grad():
        target = two_step_target(teacher_spec, teacher, x, t, mid, prev, cond, data.unconditional, w)
        from fxpress.ir.sampler import guided_output, predicted_x0
        a = torch.tensor(student_spec.alphas_cumprod)[t].view(-1, 1, 1, 1)
        x0_hat = predicted_x0(student_spec, x, guided_output(student_spec, student, x, t, cond, None, w), a)
        weight = (a / (1 - a)).clamp_min(1.0)
    return float((weight * (x0_hat - target).square()).mean())


def test_a_progressive_round_lowers_the_two_step_loss(digits):
    model, example, data = digits
    graph = capture(model, example.args, example.kwargs)
    config = DistillConfig(steps=2, teacher_steps=4, train_steps=25, batch=16, lr=5e-4)
    base = base_spec(data, "test")
    teacher_spec = grid_spec(base, 4, guidance="cfg", guidance_scale=1.5)
    student_spec = grid_spec(base, 2, guidance="none", guidance_scale=1.5, prediction="v_prediction")
    before = _round_loss(model, model, teacher_spec, student_spec, data)
    new, report = Pipeline([ProgressiveDistill(config)]).run(graph, PassContext(training_data=data))
    after = _round_loss(new.module, model, teacher_spec, student_spec, data)
    print(f"two-step loss before {before:.4f}, after 25 steps {after:.4f}")
    assert after < 0.8 * before
    spec = SamplerSpec.from_json(new.extras["sampler"])
    assert spec.timesteps == (999, 499) and spec.guidance == "none" and spec.calls_per_step == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), graph.module.parameters()))  # input untouched


def test_guidance_then_progressive_saves_and_loads_with_its_sampler(digits, tmp_path):
    model, example, data = digits
    result = fxpress.compress(model, example, "distill", training_data=data, method="guidance+progressive",
                              distill={"steps": 2, "teacher_steps": 4, "guidance": [1.0, 3.0], **TINY})
    names = [p.name for p in result.report.passes]
    assert names == ["GuidanceDistill", "ProgressiveDistill"]
    fxpress.save(result, tmp_path / "d", plot=False)
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["wrapper"]["site"] == "time_embedding" and manifest["sampler"]["guidance"] == "embedded"
    loaded = fxpress.load(tmp_path / "d")
    assert isinstance(loaded, GuidanceConditioned)
    spec = SamplerSpec.from_json(manifest["sampler"])
    noise = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        a = sample(spec, result.model, noise, data.conditions[:2], data.unconditional)
        b = sample(spec, loaded, noise, data.conditions[:2], data.unconditional)
    assert torch.equal(a, b)


def test_adversarial_trains_generator_and_discriminator(digits):
    from fxpress.passes.distill.discriminator import Discriminator

    model, example, data = digits
    for kind in ("teacher", "fresh"):
        result = fxpress.compress(model, example, "distill", training_data=data, method="adversarial",
                                  distill={"steps": 2, "teacher_steps": 2, "regression_pool": 8,
                                           "discriminator": kind, **TINY})
        details = result.report.passes[-1].details
        assert details["discriminator"] == kind and details["sampler_steps"] == 2
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), result.model.parameters()))
    # generator gradients pass through the frozen discriminator, which itself gets none from that loss
    teacher = copy.deepcopy(model).requires_grad_(False)
    x0, cond = data.batch(torch.Generator().manual_seed(0), 2)
    t = torch.full((2,), 300)
    disc = Discriminator(teacher, lambda x, t, c: data.predict(teacher, x, t, c), (x0, t, cond), cond.shape[-1])
    fake = x0.clone().requires_grad_(True)
    disc.logits(fake, t, cond, frozen=True).sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    disc.logits(x0, t, cond).sum().backward()
    assert all(p.grad is not None for p in disc.heads.parameters())
    disc.close()


def test_quantized_student_is_distilled_and_frozen(digits):
    model, example, data = digits
    result = fxpress.compress(model, example, "distill", training_data=data, method="progressive",
                              quantize="uniform", target_bits=2,
                              distill={"steps": 2, "teacher_steps": 4, **TINY})
    names = [p.name for p in result.report.passes]
    assert names.index("InsertFakeQuant") < names.index("ProgressiveDistill") < names.index("FreezeQuantized")
    assert result.summary["weights_only_bits"] == 2.0
    assert result.graph.extras["sampler"]["timesteps"] == [999, 499]


def test_low_bit_artifact_unfreezes_exactly(tiny_artifact):
    from fxpress.passes.quant.qat import fake_quant_layers

    example = zoo.get("tiny-unet").example_inputs()
    packed = fxpress.load(tiny_artifact)
    trainable = fxpress.load_trainable(tiny_artifact)
    assert fake_quant_layers(trainable)
    with torch.no_grad():
        assert torch.equal(packed(**example.kwargs).sample, trainable(**example.kwargs).sample)


@pytest.mark.parametrize("settings, match", [
    ({"method": "progressive", "distill": {"steps": 4, "teacher_steps": 12}}, "times 2, 4, 8"),
    ({"method": "progressive", "distill": {"steps": 0}}, "positive integer"),
    ({"method": "progressive", "distill": {"guidance": [2.0, 50.0]}}, "inside \\[0, 30\\]"),
    ({"method": "progressive", "distill": {"guidance": [3.0, 1.0]}}, "range"),
    ({"method": "progressive", "distill": {"guidance": [1.0, 3.0]}}, "guidance\\+progressive"),
    ({"method": "consistency"}, "each stage must be one of"),
    ({"method": "progressive", "distill": {"lr": -1}}, "lr must be positive"),
])
def test_bad_distill_settings_are_refused_before_any_work(settings, match, digits):
    model, example, data = digits
    with pytest.raises(RecipeError, match=match):
        fxpress.compress(model, example, "distill", training_data=data, **settings)


def test_teacher_without_a_schedule_and_mismatched_outputs_are_pass_errors(digits):
    model, example, data = digits
    no_schedule = DiffusionData(data.samples, data.conditions, data.unconditional, scheduler=object())
    with pytest.raises(PassError, match="no noise schedule"):
        fxpress.compress(model, example, "distill", training_data=no_schedule, distill=TINY)

    class Halves(torch.nn.Module):  # a "teacher" predicting half the channels
        def forward(self, sample, timestep, encoder_hidden_states):
            return (model(sample, timestep, encoder_hidden_states)[0][:, :0],)

    graph = capture(model, example.args, example.kwargs)
    config = DistillConfig(steps=2, teacher_steps=4, **TINY)
    with pytest.raises(PassError, match="must be two versions of one denoiser"):
        Pipeline([ProgressiveDistill(config)]).run(graph, PassContext(training_data=data, teacher=Halves()))


def test_cli_distill_then_bench_quality_samples_with_its_own_steps(tmp_path):
    from fxpress.cli import main

    out = tmp_path / "student"
    assert main(["distill", "testbed-digits-unet", "--method", "progressive", "--steps", "2", "--teacher-steps", "4",
                 "--train-steps", "2", "--batch", "4", "--out", str(out)]) == 0
    assert not (tmp_path / "student.checkpoints").exists()  # removed once the artifact is whole
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampler"]["timesteps"] == [999, 499]
    report = tmp_path / "q.json"
    assert main(["bench", "quality", str(out), "--per-prompt", "1", "--png", str(tmp_path / "s.png"),
                 "--json", str(report)]) == 0
    settings = next(iter(json.loads(report.read_text()).values()))["settings"]
    assert settings["steps"] == 2
    assert main(["bench", "quality", str(out), "--steps", "4", "--per-prompt", "1",
                 "--png", str(tmp_path / "t.png")]) == 2  # a 2-step student on a 4-step grid is refused
    bad = tmp_path / "bad"
    assert main(["distill", "testbed-digits-unet", "--steps", "4", "--teacher-steps", "12", "--out", str(bad)]) == 2
    assert main(["distill", "tiny-unet", "--out", str(bad)]) == 2  # no training data
    assert not bad.exists()


def test_a_distillation_round_under_torchrun_matches_one_process(tmp_path):
    from torchrun import one_and_two_processes

    one_and_two_processes(["distill", "testbed-digits-unet", "--method", "progressive", "--steps", "2",
                           "--teacher-steps", "4", "--train-steps", "3", "--batch", "8"], tmp_path)
    one, two = fxpress.load(tmp_path / "one"), fxpress.load(tmp_path / "two")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    rounds = next(p for p in manifest["report"] if p["name"] == "ProgressiveDistill")["details"]["rounds"]
    assert rounds[0]["world_size"] == 2
    pairs = [(a.detach().double(), b.detach().double()) for a, b in zip(one.parameters(), two.parameters())]
    diff = sum(float((a - b).square().sum()) for a, b in pairs)
    norm = sum(float(a.square().sum()) for a, _ in pairs)
    print(f"relative L2 distance between the 1- and 2-process students {(diff / norm) ** 0.5:.2e}")
    assert (diff / norm) ** 0.5 <= 1e-5


def test_cli_distills_a_saved_low_bit_artifact_and_keeps_it_low_bit(tmp_path):
    from fxpress.cli import main

    low = tmp_path / "low"
    assert main(["compress", "testbed-digits-unet", "--recipe", "uniform", "--target-bits", "4", "--no-verify",
                 "--out", str(low)]) == 0
    out = tmp_path / "low-2step"
    assert main(["distill", str(low), "--method", "progressive", "--steps", "2", "--teacher-steps", "4",
                 "--train-steps", "2", "--batch", "4", "--out", str(out)]) == 0
    before = json.loads((low / "manifest.json").read_text())
    after = json.loads((out / "manifest.json").read_text())
    assert after["lowbit_layers"].keys() == before["lowbit_layers"].keys()  # still low-bit, layer for layer
    assert after["summary"]["model"] == "testbed-digits-unet" and after["sampler"]["timesteps"] == [999, 499]
    assert [p["name"] for p in after["report"]] == ["ProgressiveDistill", "FreezeQuantized"]
    assert main(["distill", str(low), "--quantize", "uniform", "--out", str(tmp_path / "again")]) == 2


def test_adversarial_after_progressive_samples_its_teacher_as_that_teacher_was_trained(digits, tmp_path):
    model, example, data = digits
    first = fxpress.compress(model, example, "distill", training_data=data, method="progressive",
                             distill={"steps": 2, "teacher_steps": 4, **TINY})
    fxpress.save(first, tmp_path / "p2", plot=False)
    student = fxpress.load_trainable(tmp_path / "p2")
    settings = {"method": "adversarial", "distill": {"steps": 2, "teacher_steps": 8, "regression_pool": 4, **TINY}}
    flags = [p.requires_grad for p in model.parameters()]
    alone = fxpress.compress(student, example, "distill", training_data=data, **settings)
    assert alone.report.passes[0].details["teacher_steps"] == 2  # the student teaches itself on its own grid
    taught = fxpress.compress(student, example, "distill", training_data=data, teacher=model, **settings)
    assert taught.report.passes[0].details["teacher_steps"] == 8  # the original teacher, at the steps asked
    assert taught.graph.extras["sampler"]["prediction"] == "v_prediction"
    assert [p.requires_grad for p in model.parameters()] == flags  # the teacher given is not changed
