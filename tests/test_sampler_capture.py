"""The sampler as one graph: N DDIM steps with guidance unrolled into one program, each weight stored once."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch import nn

from fxpress import cli
from fxpress.errors import CaptureError, FxpressError
from fxpress.frontends.sampler_capture import UnrolledSampler, capture_sampler, sample_loop
from fxpress.ir.sampler import SamplerSpec
from fxpress.testbed.sampling import schedule

STEPS = 4


def ddim() -> DDIMScheduler:
    """The testbeds' DDIM: clipped x0, final alpha = alphas_cumprod[0]."""
    return DDIMScheduler(**schedule(), clip_sample=True, set_alpha_to_one=False)


def diffusers_loop(denoiser: nn.Module, steps: int, noise, cond, uncond=None, scale: float = 2.0,
                   guidance=None) -> torch.Tensor:
    """The reference: diffusers' DDIMScheduler.step in a Python loop, clamped to [-1, 1] at the end."""
    scheduler = ddim()
    scheduler.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            if uncond is not None:
                tt = torch.full((2 * len(x),), int(t))
                out = denoiser(sample=torch.cat([x, x]), timestep=tt, encoder_hidden_states=torch.cat([uncond, cond]))
                u, c = out.sample.chunk(2)
                pred = u + scale * (c - u)
            else:
                tt = torch.full((len(x),), int(t))
                pred = denoiser(sample=x, timestep=tt, encoder_hidden_states=cond, guidance=guidance)[0]
            x = scheduler.step(pred, t, x).prev_sample
    return x.clamp(-1, 1)


def draw(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


@pytest.fixture(scope="module")
def cfg_case(tiny_unet):
    """The tiny UNet, a 4-step CFG spec, batch-1 inputs and the exported sampler."""
    model, _ = tiny_unet
    spec = SamplerSpec.from_scheduler(ddim(), STEPS, guidance_scale=2.0)
    noise, cond, uncond = draw((1, 4, 16, 16), (1, 77, 64), (1, 77, 64))
    return model, spec, (noise, cond, uncond), capture_sampler(model, spec, (noise, cond, uncond))


@pytest.fixture(scope="module")
def lowbit(tiny_unet):
    """The tiny UNet compressed to uniform 4-bit codes (LowBit layers calling the fxpress ops)."""
    import fxpress

    model, example = tiny_unet
    return fxpress.compress(model, example, "uniform", bits=4, verify=False)


def test_unrolled_sampler_matches_diffusers_ddim_and_so_does_its_export(cfg_case):
    model, spec, inputs, exported = cfg_case
    scheduler = ddim()
    scheduler.set_timesteps(STEPS)
    assert list(spec.timesteps) == [int(t) for t in scheduler.timesteps] and spec.clip_sample == 1.0
    reference = diffusers_loop(model, STEPS, *inputs)
    with torch.no_grad():
        loop = sample_loop(model, spec, *inputs)
        unrolled = UnrolledSampler(model, spec)(*inputs)
        program = exported.module()(*inputs)
    for out in (loop, unrolled, program):
        assert (out - reference).abs().max() <= 1e-5
    assert reference.abs().max() <= 1.0


def test_the_program_holds_each_weight_once(cfg_case):
    model, _, _, exported = cfg_case
    params = exported.graph_signature.inputs_to_parameters
    assert sorted(name.removeprefix("denoiser.") for name in params.values()) == sorted(
        name for name, _ in model.named_parameters())
    assert sum(t.numel() * t.element_size() for t in exported.state_dict.values()) == sum(
        p.numel() * p.element_size() for p in model.parameters())
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    calls = sum(n.target is torch.ops.aten.conv2d.default for n in exported.graph.nodes)
    assert calls == STEPS * convs      # N calls of the network, one copy of its weights


def test_lowbit_layers_stay_lowbit_inside_the_sampler(lowbit, cfg_case):
    from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear

    _, spec, inputs, _ = cfg_case
    spec = spec.with_timesteps(list(spec.timesteps[::2]))     # 2 steps: 750 -> 250 -> end
    model = lowbit.graph.module
    lowbit_layers = [m for m in model.modules() if isinstance(m, (LowBitLinear, LowBitConv2d))]
    exported = capture_sampler(model, spec, inputs)
    ops = [n for n in exported.graph.nodes if str(n.target).startswith("fxpress.lowbit_")]
    assert len(lowbit_layers) > 10 and len(ops) == 2 * len(lowbit_layers)
    packed = [t for name, t in exported.graph_signature.inputs_to_buffers.items() if t.endswith(".packed")]
    assert len(packed) == len(lowbit_layers)
    with torch.no_grad():
        assert (exported.module()(*inputs) - sample_loop(model, spec, *inputs)).abs().max() <= 1e-5


def _ort_max_diff(path, inputs, reference) -> float:
    import numpy as np
    import onnxruntime as ort

    from fxpress.backends.onnx import ORT_EXACT

    options = ort.SessionOptions()
    for key, value in ORT_EXACT.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return float(np.abs(session.run(None, feed)[0] - reference.numpy()).max())


def test_onnx_sampler_matches_the_loop_in_onnxruntime_at_the_size_of_one_network(cfg_case, tmp_path):
    pytest.importorskip("onnxruntime")
    from fxpress.backends.onnx import export_onnx

    model, spec, inputs, _ = cfg_case
    noise, cond, uncond = inputs
    report = export_onnx(UnrolledSampler(model, spec), inputs, tmp_path / "sampler.onnx")
    single = export_onnx(model, {"sample": torch.cat([noise, noise]), "timestep": torch.tensor([999, 999]),
                                 "encoder_hidden_states": torch.cat([uncond, cond])}, tmp_path / "unet.onnx")
    with torch.no_grad():
        reference = sample_loop(model, spec, *inputs)
    assert _ort_max_diff(report.path, inputs, reference) <= 1e-4
    assert report.file_bytes <= 1.1 * single.file_bytes


def test_onnx_sampler_of_a_compressed_model_stores_each_layer_once(lowbit, cfg_case, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from fxpress.backends.onnx import export_onnx
    from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear

    _, spec, inputs, _ = cfg_case
    model = lowbit.graph.module
    spec = spec.with_timesteps(list(spec.timesteps[::2]))     # 2 steps: 750 -> 250 -> end
    report = export_onnx(UnrolledSampler(model, spec), inputs, tmp_path / "lowbit.onnx")
    proto = onnx.load(report.path)
    codes = [t for t in proto.graph.initializer if t.name.endswith("_dq_codes")]
    dequantize = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    lowbit_layers = sum(isinstance(m, (LowBitLinear, LowBitConv2d)) for m in model.modules())
    assert len(report.layers) == len(codes) == lowbit_layers      # one row and one set of codes per layer
    # one DequantizeLinear per call, less the cross-attention keys and values of step 2: they read only the
    # prompt, so the exporter's optimizer computes them once for all steps
    prompt_only = sum(name.endswith(("attn2.to_k", "attn2.to_v")) for name, m in model.named_modules()
                      if isinstance(m, (LowBitLinear, LowBitConv2d)))
    assert prompt_only > 0 and len(dequantize) == 2 * len(codes) - prompt_only
    with torch.no_grad():
        reference = sample_loop(model, spec, *inputs)
    assert _ort_max_diff(report.path, inputs, reference) <= 1e-4


def test_folding_the_fixed_timesteps_keeps_the_output_and_drops_the_time_weights(lowbit, cfg_case, tmp_path):
    pytest.importorskip("onnxruntime")
    from fxpress.backends.onnx import export_onnx
    from fxpress.ir.constant_fold import fold_module

    model, spec, inputs, _ = cfg_case
    folded, report = fold_module(UnrolledSampler(model, spec).eval(), inputs)
    with torch.no_grad():
        reference = sample_loop(model, spec, *inputs)
        assert torch.equal(folded(*inputs), reference)
    left = [n for n, _ in [*folded.named_parameters(), *folded.named_buffers()]]
    assert report["folded"] > 0 and report["dropped_bytes"] > 10 * report["added_bytes"]
    assert not any("time_embedding" in n or "time_emb_proj" in n for n in left)
    assert any("to_q" in n for n in left)  # weights that see the image stay, once each
    low = lowbit.graph.module
    two = spec.with_timesteps(list(spec.timesteps[::2]))
    path = export_onnx(UnrolledSampler(low, two), inputs, tmp_path / "folded.onnx", fold=True).path
    with torch.no_grad():
        assert _ort_max_diff(path, inputs, sample_loop(low, two, *inputs)) <= 1e-4


@pytest.mark.mobile
def test_executorch_sampler_runs_in_the_runtime_at_the_size_of_one_network(tmp_path):
    pytest.importorskip("executorch")
    from fxpress.backends.executorch import export_executorch, run_executorch

    torch.manual_seed(0)    # one level, no mid block: a quick lowering that still splits into many delegates
    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(128,),
                                 down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                 mid_block_type=None, layers_per_block=1, cross_attention_dim=32,
                                 attention_head_dim=8, norm_num_groups=8).eval()
    spec = SamplerSpec.from_scheduler(ddim(), 2, guidance_scale=2.0)
    inputs = tuple(draw((1, 4, 8, 8), (1, 7, 32), (1, 7, 32)))
    report = export_executorch(UnrolledSampler(model, spec), inputs, tmp_path / "sampler.pte", weights="float")
    assert report.delegated_calls > 2 * 10          # the steps' weights are spread over many XNNPACK delegates
    with torch.no_grad():
        reference = sample_loop(model, spec, *inputs)
    assert (run_executorch(report.path, inputs)[0] - reference).abs().max() <= 1e-4
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.file_bytes <= 1.1 * weight_bytes   # so also <= 1.1x the one-network file, which holds them all


class GuidedDenoiser(nn.Module):
    """A guidance-conditioned denoiser: the UNet's prediction scaled by (1 + guidance / 20)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet, self.calls = unet, 0

    def forward(self, sample, timestep, encoder_hidden_states, guidance):
        self.calls += 1
        out = self.unet(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states).sample
        return (out * (1 + guidance.reshape(-1, 1, 1, 1) / 20),)


def test_embedded_guidance_is_one_call_per_step_with_the_scale_as_an_input(tiny_unet):
    model, _ = tiny_unet
    denoiser = GuidedDenoiser(model)
    spec = SamplerSpec.from_scheduler(ddim(), 2, guidance="embedded", guidance_scale=3.0)
    noise, cond = draw((1, 4, 16, 16), (1, 77, 64))
    with torch.no_grad():
        default = sample_loop(denoiser, spec, noise, cond)
        assert denoiser.calls == 2
        assert (default - diffusers_loop(denoiser, 2, noise, cond, guidance=torch.tensor([3.0]))).abs().max() <= 1e-5
        exported = capture_sampler(denoiser, spec, {"noise": noise, "cond": cond, "guidance": torch.tensor([3.0])})
        for scale in (3.0, 7.0):   # the scale is an input of the program, not a constant of the example
            g = torch.tensor([scale])
            reference = diffusers_loop(denoiser, 2, noise, cond, guidance=g)
            assert (exported.module()(noise, cond, guidance=g) - reference).abs().max() <= 1e-5


def test_text_encoder_inside_the_sampler_takes_token_ids():
    from fxpress.testbed.models import load_testbed

    testbed = load_testbed("digits")
    spec = SamplerSpec.from_scheduler(ddim(), 2, guidance_scale=testbed.spec.guidance)
    ids, empty = testbed.tokenizer(["a handwritten seven"]), testbed.tokenizer([""])
    (noise,) = draw((1, 1, 16, 16))
    exported = capture_sampler(testbed.denoiser, spec, (noise, ids, empty), text_encoder=testbed.text_encoder)
    with torch.no_grad():
        reference = sample_loop(testbed.denoiser, spec, noise, testbed.encode(["a handwritten seven"]),
                                testbed.encode([""]))
        assert (exported.module()(noise, ids, empty) - reference).abs().max() <= 1e-5


def test_bad_inputs_are_typed_errors(tiny_unet):
    model, _ = tiny_unet
    spec = SamplerSpec.from_scheduler(ddim(), 2)
    noise, cond = draw((1, 4, 16, 16), (1, 77, 64))
    with pytest.raises(CaptureError, match="guidance 'cfg' needs 'uncond'"):
        capture_sampler(model, spec, (noise, cond))
    with pytest.raises(CaptureError, match="takes no keyword 'guidance'"):
        capture_sampler(model, dataclasses.replace(spec, guidance="embedded"), (noise, cond))
    with pytest.raises(CaptureError, match="'uncond' of shape"):
        capture_sampler(model, spec, (noise, cond, cond[:, :5]))
    with pytest.raises(CaptureError, match="takes no 'guidance' input"):
        capture_sampler(model, dataclasses.replace(spec, guidance="none"), {"noise": noise, "cond": cond,
                                                                          "guidance": torch.ones(1)})
    with pytest.raises(CaptureError, match="must be token ids"):
        capture_sampler(model, spec, (noise, cond, cond), text_encoder=nn.Identity())
    with pytest.raises(CaptureError, match="tuple or dict"):
        capture_sampler(model, spec, noise)
    with pytest.raises(FxpressError, match="one previous timestep per timestep"):
        spec.with_timesteps([])     # zero steps: no spec to unroll


@pytest.fixture(scope="module")
def artifacts(lowbit, tmp_path_factory):
    """(artifact recording a 2-step sampler, artifact recording none, scheduler folder)."""
    import fxpress

    root = tmp_path_factory.mktemp("sampler-artifacts")
    plain = root / "plain"
    fxpress.save(lowbit, plain, plot=False)
    spec = SamplerSpec.from_scheduler(ddim(), 2, guidance_scale=2.0, notes={"method": "progressive"})
    lowbit.graph.extras["sampler"] = spec.to_json()
    try:
        fxpress.save(lowbit, root / "distilled", plot=False)
    finally:
        lowbit.graph.extras.pop("sampler")
    ddim().save_config(root / "scheduler")
    return root / "distilled", plain, root / "scheduler"


def test_cli_exports_the_recorded_sampler_and_refuses_other_step_counts(artifacts, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    distilled, _, _ = artifacts
    out = tmp_path / "sampler.onnx"
    assert cli.main(["export", str(distilled), "--to", "onnx", "--sampler", "--out", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_size > 0 and "max abs difference" in printed and "CPU time per image" in printed
    difference = float(printed.split("max abs difference")[1].split()[0])
    assert difference <= 1e-4
    assert cli.main(["export", str(distilled), "--to", "onnx", "--sampler", "--steps", "4", "--out",
                     str(tmp_path / "four.onnx")]) == 2
    assert "supports only its recorded 2-step sampler" in capsys.readouterr().err
    assert not (tmp_path / "four.onnx").exists()


def test_cli_unrolls_ddim_over_a_scheduler_config_and_says_what_to_pass(artifacts, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    _, plain, scheduler = artifacts
    out = tmp_path / "ddim.onnx"
    assert cli.main(["export", str(plain), "--sampler", "--out", str(out)]) == 2
    assert "records no sampler; pass --scheduler PATH" in capsys.readouterr().err
    assert cli.main(["export", str(plain), "--sampler", "--steps", "0", "--scheduler", str(scheduler),
                     "--out", str(out)]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert cli.main(["export", str(plain), "--sampler", "--steps", "2", "--guidance", "3",
                     "--scheduler", str(scheduler / "scheduler_config.json"), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
