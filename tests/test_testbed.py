"""The testbed: datasets, tokenizer, metrics, the committed trained weights and `fxpress bench quality`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fxpress.errors import ArtifactError, FxpressError
from fxpress.testbed import shapes
from fxpress.testbed.quality import frechet_distance
from fxpress.testbed.text import END, PAD, START, WordTokenizer


def test_digit_splits_are_disjoint_and_scaled():
    from fxpress.testbed.digits import WORDS, load_digits_split

    train, test = load_digits_split("train"), load_digits_split("test")
    assert len(train) + len(test) == 1797 and len(test) == 300
    assert train.images.shape[1:] == (1, 16, 16) and -1 <= float(train.images.min()) <= float(train.images.max()) <= 1
    flat = {tuple(x.flatten().tolist()) for x in test.images}
    assert not any(tuple(x.flatten().tolist()) in flat for x in train.images[:300])
    assert train.captions[0] == f"a handwritten {WORDS[int(train.factors['digit'][0])]}"


def test_shapes_are_drawn_from_their_factors():
    images = shapes.make_shapes(64, seed=5)
    assert images.images.shape == (64, 3, 32, 32)
    assert images.captions == [shapes.caption(*(int(images.factors[k][i]) for k in shapes.FACTORS)) for i in range(64)]
    for i in range(64):  # the quadrant the caption names holds the shape's colour; the opposite one is background
        position, colour = int(images.factors["position"][i]), int(images.factors["colour"][i])
        y, x = (8, 8) if position == 0 else (8, 24) if position == 1 else (24, 8) if position == 2 else (24, 24)
        rgb = torch.tensor(list(shapes.COLOURS.values())[colour]) * 2 - 1
        crop = images.images[i, :, y - 3:y + 4, x - 3:x + 4].reshape(3, -1)
        assert (crop - rgb[:, None]).abs().max(0).values.min() < 0.05
        far = images.images[i, :, 31 - y, 31 - x]
        assert torch.allclose(far, torch.full((3,), 0.08 * 2 - 1), atol=1e-6)
    assert torch.equal(shapes.make_shapes(64, seed=5).images, images.images)  # reproducible


def test_tokenizer_round_trip_and_errors():
    tok = WordTokenizer(["a", "red", "circle"], max_length=5)
    ids = tok(["a red circle", ""])
    assert ids.tolist() == [[START, 3, 4, 5, END], [START, END, PAD, PAD, PAD]]
    with pytest.raises(FxpressError, match="outside the testbed vocabulary"):
        tok(["a blue circle"])
    with pytest.raises(FxpressError, match="longer"):
        tok(["a red red circle"])


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 6))
    assert frechet_distance(a, a) < 1e-8
    shifted = a + np.array([1.0, 0, 0, 0, 0, 2.0])
    assert frechet_distance(a, shifted) == pytest.approx(5.0, rel=1e-6)
    scaled = a * 2  # |mu|^2 + tr(S) + tr(4S) - 2 tr(2S) = |mu|^2 + tr(S)
    expected = (a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, scaled) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", ["digits", "digits-dit", "shapes"])
def test_committed_weights_load_and_record_their_training(name):
    """The recorded quality of each committed testbed: every factor of its samples right at least 90% of the
    time; the classifier reads the nuisance angles (shapes: rotation) to a few degrees."""
    from fxpress.testbed import load_testbed

    testbed = load_testbed(name)
    record = testbed.record
    assert record["classifier_heldout_accuracy"] >= 0.95
    factors = record["quality"]["factor_accuracy"]
    assert min(factors.values()) >= 0.9, factors
    # shapes needs all four factors right at once (83.5% committed); the others name one factor
    assert record["quality"]["accuracy"] >= (0.9 if name != "shapes" else 0.8)
    for angle, error in record.get("classifier_heldout_angle_error_deg", {}).items():
        assert error["mean"] <= 0.05 * error["period"], (angle, error)
    assert set(record.get("classifier_heldout_angle_error_deg", {})) == set(testbed.spec.angles)
    assert record["schedule"]["prediction_type"] == testbed.spec.prediction
    assert sum(record["params"].values()) == sum(p.numel() for m in testbed.parts().values() for p in m.parameters())
    assert not any(p.requires_grad for p in testbed.denoiser.parameters())


def test_missing_weights_are_a_typed_error(tmp_path):
    from fxpress.testbed import load_testbed

    with pytest.raises(ArtifactError, match="train them with"):
        load_testbed("digits", tmp_path)


def test_bench_quality_compares_fp32_and_an_artifact(tmp_path):
    """The FP32 testbed UNet reaches >= 90% sample accuracy; an artifact is judged on the same seeds."""
    from fxpress.cli import main

    artifact = tmp_path / "ptq"
    assert main(["compress", "testbed-digits-unet", "--recipe", "uniform", "--out", str(artifact),
                 "--no-verify"]) == 0
    png, report = tmp_path / "grid.png", tmp_path / "quality.json"
    assert main(["bench", "quality", "testbed-digits-unet", str(artifact), "--per-prompt", "10",
                 "--png", str(png), "--json", str(report)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(report.read_text())
    fp32 = results["testbed-digits-unet (fp32)"]
    assert fp32["accuracy"] >= 0.9 and fp32["samples"] == 100
    assert len(results) == 2


def test_bench_quality_refuses_untrained_models(tiny_artifact):
    from fxpress.cli import main

    assert main(["bench", "quality", "tiny-unet"]) == 2
    assert main(["bench", "quality", str(tiny_artifact)]) == 2


@pytest.mark.parametrize("name", ["shapes", "digits-dit"])
def test_testbed_models_fit_their_data(name):
    """Captions tokenize; the denoiser (UNet or DiT, by its own keyword) and the classifier take the images."""
    from fxpress.testbed import build_testbed
    from fxpress.testbed.sampling import predict_noise

    testbed = build_testbed(name)
    spec = testbed.spec
    images = spec.load_split("test")
    with torch.no_grad():
        hidden = testbed.encode(images.captions[:4])
        eps = predict_noise(testbed.denoiser, images.images[:4], torch.tensor([1, 10, 100, 999]), hidden,
                            spec.sample_input)
        logits = testbed.classifier(images.images[:4])
    assert eps.shape == images.images[:4].shape and hidden.shape == (4, spec.max_length, 64)
    assert {k: v.shape[1] for k, v in logits.items()} == spec.factors


def test_unknown_denoiser_kind_is_refused():
    from fxpress.testbed.specs import DIGITS, TestbedSpec

    with pytest.raises(FxpressError, match="unknown denoiser 'rnn'"):
        TestbedSpec(**{**DIGITS.__dict__, "name": "x", "denoiser": "rnn"})


def test_unknown_prediction_kind_is_refused():
    from fxpress.testbed.specs import DIGITS, TestbedSpec

    with pytest.raises(FxpressError, match="unknown prediction 'x0'"):
        TestbedSpec(**{**DIGITS.__dict__, "name": "x", "prediction": "x0"})


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_training_targets_follow_the_prediction_kind(prediction):
    """Noise or velocity v = sqrt(a) eps - sqrt(1 - a) x0; denoising MSE turns a velocity back into noise."""
    from fxpress.testbed.sampling import training_scheduler
    from fxpress.training.diffusion_data import DiffusionData

    scheduler = training_scheduler(prediction)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 250, 600, 999])
    data = DiffusionData(x0, torch.zeros(4, 2, 8), torch.zeros(1, 2, 8), scheduler)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    want = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    assert torch.allclose(data.target(x0, noise, t), want, atol=1e-6)
    noisy = data.add_noise(x0, noise, t)
    if prediction == "v_prediction":  # the inversion denoising_mse uses
        assert torch.allclose(a.sqrt() * want + (1 - a).sqrt() * noisy, noise, atol=1e-5)


def test_the_classifier_alone_can_be_trained_again(tmp_path):
    """`--classifier-only` retrains the judge of a saved testbed, leaves its denoiser untouched and records
    the new classifier and the samples measured with it."""
    import shutil

    from safetensors.torch import load_file

    from fxpress.testbed.models import weights_dir
    from fxpress.testbed.train import main

    folder = tmp_path / "digits"
    shutil.copytree(weights_dir("digits"), folder)
    before = json.loads((folder / "training.json").read_text())
    assert main(["digits", "--out", str(folder), "--classifier-only", "--classifier-steps", "3"]) == 0
    after = json.loads((folder / "training.json").read_text())
    assert after["train"]["classifier_steps"] == 3 and after["classifier_heldout_accuracy"] < 0.9
    assert after["quality"]["accuracy"] != before["quality"]["accuracy"]
    for part in ("denoiser", "text_encoder"):
        old, new = load_file(str(weights_dir("digits") / f"{part}.safetensors")), load_file(
            str(folder / f"{part}.safetensors"))
        assert all(torch.equal(old[k], new[k]) for k in old)
    assert main(["digits", "--out", str(tmp_path / "missing"), "--classifier-only"]) == 2


def test_a_saved_testbed_can_be_trained_further(tmp_path):
    """`--init-from` continues a saved testbed's denoiser and text encoder with a fresh optimizer, keeps its
    classifier bit for bit and records where the earlier steps came from."""
    from safetensors.torch import load_file

    from fxpress.testbed.models import weights_dir
    from fxpress.testbed.train import main

    out = tmp_path / "more"
    assert main(["digits", "--out", str(out), "--init-from", str(weights_dir("digits")), "--steps", "2",
                 "--batch", "4", "--lr", "1e-3", "--no-quality"]) == 0
    before = json.loads((weights_dir("digits") / "training.json").read_text())
    after = json.loads((out / "training.json").read_text())
    assert after["train"]["total_steps"] == before["train"]["steps"] + 2 and after["train"]["steps"] == 2
    assert after["continued_from"]["path"] == str(weights_dir("digits"))
    assert after["classifier_heldout_accuracy"] == before["classifier_heldout_accuracy"]
    changed = {}
    for part in ("classifier", "denoiser", "text_encoder"):
        old, new = load_file(str(weights_dir("digits") / f"{part}.safetensors")), load_file(
            str(out / f"{part}.safetensors"))
        changed[part] = not all(torch.equal(old[k], new[k]) for k in old)
    assert changed == {"classifier": False, "denoiser": True, "text_encoder": True}
    assert main(["digits", "--out", str(tmp_path / "x"), "--init-from", str(tmp_path / "missing"), "--steps", "1",
                 "--no-quality"]) == 2
