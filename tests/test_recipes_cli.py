"""Recipes are validated before any work; the CLI writes nothing and exits 2 on bad input."""

from __future__ import annotations

import pytest

import fxpress
from fxpress.cli import main
from fxpress.errors import RecipeError


@pytest.mark.parametrize("overrides, match", [
    ({"target_bits": 0.5}, "impossible"),
    ({"target_bits": 12.0}, "impossible"),
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
    assert "impossible" in capsys.readouterr().err
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
