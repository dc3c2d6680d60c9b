"""Recipes are validated before any work; the CLI writes nothing and exits 2 on bad input."""

from __future__ import annotations

import pytest

import fxpress
from fxpress.cli import main
from fxpress.errors import RecipeError


@pytest.mark.parametrize("overrides, match", [
    ({"target_bits": 0.5}, "below the lowest possible, 1.585"),
    ({"target_bits": 1.58}, "below the lowest possible, 1.585"),
    ({"widths": (2, 9)}, "1..8"),
    ({"widths": (0,)}, "1..8"),
    ({"grids": ("ternary",)}, "grids"),
    ({"eta": 2.0}, "eta"),
    ({"sensitivity": "magic"}, "sensitivity"),
    ({"scale_init": "random"}, "scale_init"),
    ({"colour": "blue"}, "unknown recipe field"),
    ({"budget_bytes": -5}, "positive"),
])
def test_invalid_recipes(overrides, match):
    with pytest.raises(RecipeError, match=match):
        fxpress.make_recipe("bitsfusion", **overrides)


def test_unknown_recipe_name():
    with pytest.raises(RecipeError, match="unknown recipe"):
        fxpress.make_recipe("bitsconfusion")


def test_toml_recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('recipe = "bitsfusion"\ntarget_bits = 2.5\nwidths = [2, 3, 4]\neta = 0.2\n')
    recipe = fxpress.make_recipe(path)
    assert recipe.target_bits == 2.5 and recipe.widths == (2, 3, 4) and recipe.eta == 0.2
    path.write_text("target_bits = [")
    with pytest.raises(RecipeError, match="cannot read"):
        fxpress.make_recipe(path)


def test_unknown_layer_name_fails_before_work(tiny_unet):
    model, example = tiny_unet
    with pytest.raises(RecipeError, match="matches no layer"):
        fxpress.compress(model, example, "bitsfusion", keep=("first", "down_blocks.9.*"))


def test_cli_bad_target_writes_nothing(tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["compress", "tiny-unet", "--target-bits", "0.3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "below the lowest possible, 1.585" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_unknown_model(tmp_path, capsys):
    assert main(["compress", "sd99", "--out", str(tmp_path / "x")]) == 2
    assert "unknown zoo model" in capsys.readouterr().err


def test_cli_compress_and_inspect(tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["compress", "tiny-unet", "--recipe", "uniform", "--out", str(out), "--no-verify"]) == 0
    assert (out / "manifest.json").exists()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "down_blocks.0.resnets.0.conv1" in text and "stored bits per quantized weight" in text
    assert main(["compress", "tiny-unet", "--recipe", "uniform", "--out", str(out)]) == 2


def test_target_bits_for_every_quantizing_recipe():
    """One name for one idea: `target_bits` sets the width of uniform and of trilevel's quantization stage."""
    assert fxpress.make_recipe("uniform", target_bits=4).width == 4
    assert fxpress.make_recipe("uniform", target_bits=3.9).width == 3
    assert fxpress.make_recipe("uniform", target_bits=2.5, grid="balanced").width == 2   # b2 costs 2.32
    assert fxpress.make_recipe("uniform", bits=3).width == 3 and fxpress.make_recipe("uniform").width == 2
    assert fxpress.make_recipe("uniform", bits=4, target_bits=4).width == 4
    with pytest.raises(RecipeError, match="over target_bits=3"):
        fxpress.make_recipe("uniform", bits=4, target_bits=3)
    with pytest.raises(RecipeError, match="below the lowest possible"):
        fxpress.make_recipe("uniform", target_bits=0.9)
    trilevel = fxpress.make_recipe("trilevel", quantize="uniform", target_bits=4, budget=0.6, cost="flops")
    assert trilevel.quantize_recipe().width == 4
    bits = fxpress.make_recipe("trilevel", quantize="bitsfusion", target_bits=2.5, cost="flops")
    assert [p.target_bits for p in bits.passes() if type(p).__name__ == "AllocateBits"] == [2.5]
    with pytest.raises(RecipeError, match="needs a quantization stage"):
        fxpress.make_recipe("trilevel", target_bits=4)
    with pytest.raises(RecipeError, match="lowest possible"):
        fxpress.make_recipe("trilevel", quantize="bitsfusion", target_bits=1.0)


def test_uniform_target_bits_compresses_at_that_width(tiny_unet):
    model, example = tiny_unet
    result = fxpress.compress(model, example, "uniform", target_bits=4, verify=False)
    assert result.summary["weights_only_bits"] == 4.0


def test_quiet_silences_log_lines_and_bars_but_not_the_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FXPRESS_QUIET", "0")
    out = tmp_path / "art"
    assert main(["compress", "tiny-unet", "--recipe", "uniform", "--out", str(out), "--no-verify"]) == 0
    loud = capsys.readouterr()
    assert "AssignUniform" in loud.err  # the pipeline's per-pass log lines
    assert main(["compress", "tiny-unet", "--recipe", "uniform", "--out", str(out), "--no-verify",
                 "--overwrite", "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and "bits per quantized weight" in quiet.out


def test_cli_errors_are_one_line_unless_debug(tmp_path, capsys):
    args = ["compress", "tiny-unet", "--target-bits", "1.0", "--out", str(tmp_path / "a")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: RecipeError:") and "Traceback" not in err[0]
    with pytest.raises(RecipeError):
        main([*args, "--debug"])
    with pytest.raises(RecipeError):
        main(["--debug", *args])
