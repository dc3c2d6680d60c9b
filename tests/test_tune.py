"""Reward fine-tuning on the testbeds: prompt splits, rewards per testbed, the tune recipe (encoder, then
denoiser), the tuned folder, `fxpress tune` / `fxpress blend`, and one reward step under torchrun."""

from __future__ import annotations

import json

import pytest
import torch

from fxpress.cli import main
from fxpress.errors import FxpressError, RecipeError
from fxpress.passes.reward.finetune import RewardConfig
from fxpress.passes.reward.levels import reward_levels
from fxpress.testbed.models import load_testbed
from fxpress.testbed.tuned_folder import is_tuned_folder, load_tuned
from fxpress.testbed.tuning import (
    make_rewards,
    prompt_set,
    prompt_split,
    reward_classifier,
    sampler_spec,
    style_names,
    unsaid_variety,
)
from fxpress.tune import LEVEL_SEED, TuneRecipe, parse_rewards, tune


@pytest.fixture(scope="module")
def digits():
    return load_testbed("digits")


def test_prompt_split_holds_out_every_third_prompt_and_names_every_factor(digits):
    shapes = load_testbed("shapes")
    for testbed, sizes in ((digits, (7, 3)), (shapes, (128, 64))):
        train, held = prompt_split(testbed)
        assert (len(train), len(held)) == sizes
        assert not {c for c, _ in train} & {c for c, _ in held}
        prompts = prompt_set(testbed, held)
        assert set(prompts.targets) == set(testbed.spec.factors)
        assert all(bool((v >= 0).all()) for v in prompts.targets.values())
        assert prompts.input_ids.shape == (sizes[1], testbed.spec.max_length)
    assert "a handwritten two" in {c for c, _ in prompt_split(digits)[1]}


def test_prompts_may_leave_factors_unsaid_for_a_style_to_choose(digits):
    shapes = load_testbed("shapes")
    train, held = prompt_split(shapes, ["colour"])
    assert (len(train), len(held)) == (22, 10)  # 4 shapes x 2 sizes x 4 positions, every third held out
    assert not {c for c, _ in train} & {c for c, _ in held}
    colours = ("red", "green", "blue", "yellow", "magenta", "cyan")
    assert not any(word in caption.split() for caption, _ in train + held for word in colours)
    assert "a small circle at the bottom left" in {c for c, _ in held}
    prompts = prompt_set(shapes, held)
    assert bool((prompts.targets["colour"] == -1).all())
    assert all(bool((prompts.targets[k] >= 0).all()) for k in ("shape", "size", "position"))
    with pytest.raises(FxpressError, match="no factor 'hue' to leave unsaid; its factors: shape, colour"):
        prompt_split(shapes, ["hue"])
    with pytest.raises(FxpressError, match="leaves no prompt"):
        prompt_split(shapes, list(shapes.spec.factors))
    with pytest.raises(FxpressError, match="cannot write captions that leave a factor unsaid"):
        prompt_split(digits, list(digits.spec.factors)[:1])


def test_variety_is_the_entropy_of_an_unsaid_factor_as_the_classifier_reads_it():
    from types import SimpleNamespace

    read = torch.tensor([0, 1, 2, 3, 0, 0, 5, 5])  # the classifier's colour for 8 images

    def classifier(images):
        return {"colour": torch.nn.functional.one_hot(read, 6).float(), "shape": torch.zeros(8, 4)}

    testbed = SimpleNamespace(classifier=classifier)
    images = torch.zeros(8, 3, 4, 4)
    colour = torch.tensor([-1, -1, -1, -1, 2, 2, 2, 2])  # only the first four prompts leave the colour unsaid
    assert unsaid_variety(testbed, images, {"colour": colour, "shape": torch.zeros(8, dtype=torch.long)}) == {
        "colour variety": 2.0}
    colour = torch.tensor([-1, -1, 0, 0, -1, -1, 0, 0])  # unsaid on images read 0, 1, 0, 0: 1/4 and 3/4
    variety = unsaid_variety(testbed, images, {"colour": colour})["colour variety"]
    assert variety == pytest.approx(-(0.25 * torch.tensor(0.25).log2() + 0.75 * torch.tensor(0.75).log2()).item())
    assert unsaid_variety(testbed, images, {"colour": torch.zeros(8, dtype=torch.long)}) == {}


def test_rewards_are_chosen_per_testbed_and_named_when_wrong(digits):
    assert set(style_names(digits)) == {"bright", "dark", "thick", "thin"}
    shapes = load_testbed("shapes")
    assert set(style_names(shapes)) == {"bright", "dark", "vivid", "muted", "warm", "cool", "upright", "tilted"}
    with pytest.raises(FxpressError, match="upright reward needs its own classifier"):
        make_rewards(shapes, {"upright": 1.0})
    with pytest.raises(FxpressError, match="no reward 'upright'"):
        make_rewards(digits, {"upright": 1.0})
    with pytest.raises(FxpressError, match="no reward 'vivid'"):
        make_rewards(digits, {"vivid": 1.0})
    with pytest.raises(FxpressError, match="no reward 'warm'"):
        make_rewards(digits, {"warm": 1.0})
    with pytest.raises(FxpressError, match="own classifier"):
        make_rewards(digits, {"alignment": 1.0})
    assert parse_rewards(["bright=0.5", "alignment"]) == (("bright", 0.5), ("alignment", 1.0))
    with pytest.raises(RecipeError, match="NAME=WEIGHT"):
        parse_rewards(["bright=lots"])
    with pytest.raises(RecipeError, match="target"):
        TuneRecipe(target="vae").validate()
    with pytest.raises(RecipeError, match="lora_rank applies"):
        TuneRecipe(lora_rank=4).validate()
    with pytest.raises(RecipeError, match="named twice"):
        TuneRecipe(rewards=(("thick", 1.0), ("thick", 2.0))).validate()
    with pytest.raises(RecipeError, match="keep names \\['alignment'\\]"):
        TuneRecipe(rewards=(("thick", 1.0),), keep=("alignment",)).validate()
    with pytest.raises(RecipeError, match="keep_samples"):
        TuneRecipe(keep=("alignment",), keep_samples=0).validate()
    bounded = RewardConfig(drift_limit=0.1)
    both = TuneRecipe(target="encoder+denoiser", train=bounded).validate()  # the denoiser stage drops the limit
    assert both.train.drift_limit == 0.1 and both.denoiser_config.drift_limit is None
    for recipe in (TuneRecipe(target="denoiser", train=bounded),
                   TuneRecipe(target="encoder+denoiser", denoiser_train=bounded)):
        with pytest.raises(RecipeError, match="drift_limit bounds the tuned encoder"):
            recipe.validate()


def test_reward_classifier_is_saved_into_a_new_folder_and_loaded_back(digits, tmp_path):
    path = tmp_path / "new" / "deeper" / "classifier.safetensors"
    trained = reward_classifier(digits, steps=2, path=path)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    loaded = reward_classifier(digits, seed=7, path=path)  # read back, not retrained from another seed
    for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_tune_encoder_then_denoiser_lora_leaves_the_input_and_keeps_the_classes(digits):
    before = {part: {k: v.clone() for k, v in m.state_dict().items()} for part, m in digits.parts().items()}
    recipe = TuneRecipe(rewards=(("thick", 1.0), ("bright", 1.0)), target="encoder+denoiser", lora_rank=2,
                        train=RewardConfig(steps=2, batch=2, lr=1e-3, grad_steps=2), keep=("bright",), keep_samples=8)
    result = tune(digits, recipe)
    shape = (digits.spec.channels, digits.spec.resolution, digits.spec.resolution)
    level = reward_levels(make_rewards(digits, {"bright": 1.0}), sampler_spec(digits), digits.text_encoder,
                          digits.denoiser, prompt_set(digits, prompt_split(digits)[0]), shape, 8, seed=LEVEL_SEED)
    assert [r["floors"] for r in result.reports] == [level, level]  # the original's level, for both stages
    for part, module in digits.parts().items():
        assert all(torch.equal(v, before[part][k]) for k, v in module.state_dict().items()), part
    assert [r["stage"] for r in result.reports] == ["encoder", "denoiser"]
    assert result.reports[1]["branches"] == ["reward"]
    for part in ("text_encoder", "denoiser"):
        tuned = getattr(result.testbed, part)
        assert type(tuned) is type(getattr(digits, part))
        assert set(tuned.state_dict()) == set(before[part])  # the LoRA is folded in
        assert any(not torch.equal(v, before[part][k]) for k, v in tuned.state_dict().items()), part


def test_cli_tune_writes_a_folder_that_loads_compresses_and_blends(tmp_path, capsys):
    out = tmp_path / "thick"
    assert main(["--quiet", "tune", "testbed-digits-unet", "--reward", "thick=1", "--steps", "2", "--batch", "2",
                 "--grad-steps", "2", "--lr", "1e-3", "--eval-per-prompt", "1", "--drift-limit", "0.5",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "thick/eval" in printed.out and "accuracy" in printed.out
    assert "Writing model shards" not in printed.err + printed.out
    assert is_tuned_folder(out)
    record = json.loads((out / "record.json").read_text())
    assert record["rewards"] == {"thick": 1.0} and record["held_out"]["prompts"] == 3
    assert record["settings"]["drift_limit"] == 0.5 and record["stages"][0]["drift_last_batch"] > 0
    tuned, original = load_tuned(out), load_testbed("digits")
    moved = [k for k, v in tuned.text_encoder.state_dict().items()
             if not torch.equal(v, original.text_encoder.state_dict()[k])]
    assert moved and all(torch.equal(v, original.denoiser.state_dict()[k])
                         for k, v in tuned.denoiser.state_dict().items())
    assert main(["--quiet", "compress", str(out), "--component", "text_encoder", "--recipe", "uniform",
                 "--target-bits", "4", "--out", str(tmp_path / "encoder4")]) == 0
    for weight in (1.0, 0.0, 0.5):
        blended = tmp_path / f"blend{weight}"
        assert main(["--quiet", "blend", str(out), "digits", "--weight", str(weight), "--out", str(blended)]) == 0
        got = load_tuned(blended).text_encoder.state_dict()
        for key in moved:
            a, b = tuned.text_encoder.state_dict()[key], original.text_encoder.state_dict()[key]
            torch.testing.assert_close(got[key], torch.lerp(b, a, weight), rtol=0, atol=1e-7)


def test_cli_tune_leaves_a_factor_unsaid_for_a_palette_reward(tmp_path, capsys):
    out = tmp_path / "warm"
    assert main(["--quiet", "tune", "shapes", "--reward", "warm=1", "--leave-unsaid", "colour", "--steps", "1",
                 "--batch", "2", "--grad-steps", "2", "--lr", "1e-3", "--eval-per-prompt", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warm/eval" in printed and "colour variety" in printed  # the palette's entropy, before and after
    record = json.loads((out / "record.json").read_text())
    assert record["unsaid"] == ["colour"] and record["held_out"]["prompts"] == 10  # 32 prompts without a colour
    original = load_testbed("shapes").text_encoder.state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in load_tuned(out).text_encoder.state_dict().items())


def test_cli_tune_and_blend_refuse_bad_input_without_writing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["--quiet", "tune", "testbed-digits-unet", "--reward", "vivid=1", "--out", str(out)]) == 2
    assert "no reward 'vivid'" in capsys.readouterr().err and not out.exists()
    assert main(["--quiet", "tune", "sd15-unet", "--reward", "bright=1", "--out", str(out)]) == 2
    assert "not a testbed model" in capsys.readouterr().err and not out.exists()
    assert main(["--quiet", "tune", "digits", "--reward", "bright=1", "--grad-steps", "0", "--out", str(out)]) == 2
    assert "--grad-steps" in capsys.readouterr().err
    assert main(["--quiet", "tune", "digits", "--reward", "thick=1", "--keep", "alignment", "--out", str(out)]) == 2
    assert "keep names ['alignment']" in capsys.readouterr().err and not out.exists()
    assert main(["--quiet", "tune", "digits", "--reward", "thick=1", "--target", "denoiser", "--drift-limit", "0.1",
                 "--out", str(out)]) == 2
    assert "drift_limit bounds the tuned encoder" in capsys.readouterr().err and not out.exists()
    assert main(["--quiet", "tune", "digits", "--reward", "thick=1", "--leave-unsaid", "colour", "--out",
                 str(out)]) == 2
    assert "no factor 'colour' to leave unsaid" in capsys.readouterr().err and not out.exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["--quiet", "blend", "digits", "digits", "--weight", "0.5", "--out", str(busy), "--overwrite"]) == 2
    assert "not a tuned testbed folder" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "mine"
    assert main(["--quiet", "blend", "digits", "shapes", "--weight", "0.5", "--out", str(out)]) == 2
    assert "different testbeds" in capsys.readouterr().err and not out.exists()


def test_one_reward_step_under_torchrun_matches_one_process(tmp_path):
    from torchrun import one_and_two_processes

    # `bright` kept at the original's level: the hinge reads the mean over both processes' images
    one, two = one_and_two_processes(["tune", "testbed-digits-unet", "--reward", "thick=1", "--reward", "bright=1",
                                      "--keep", "bright", "--keep-samples", "8", "--steps", "1",
                                      "--batch", "4", "--grad-steps", "2", "--lr", "1e-3",
                                      "--eval-per-prompt", "0"], tmp_path)
    record = json.loads((two / "record.json").read_text())
    assert record["stages"][0]["world_size"] == 2 and set(record["floors"]) == {"bright"}
    original = load_testbed("digits").text_encoder.state_dict()
    a, b = load_tuned(one).text_encoder.state_dict(), load_tuned(two).text_encoder.state_dict()
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    change = sum(float((a[k].double() - original[k].double()).square().sum()) for k in a)
    print(f"relative L2 distance between the 1- and 2-process updates {(diff / change) ** 0.5:.2e}")
    assert change > 0 and (diff / change) ** 0.5 <= 1e-4
