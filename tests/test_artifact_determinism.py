"""Same model, recipe and seed -> byte-identical artifact: the sha256 of every file of two runs' folders match."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from artifact_fuzz import example_input, tiny_model

import fxpress
from fxpress.passes.pipeline import is_wall_time


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def residual_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()


RUNS = {
    "bitsfusion": (tiny_model, lambda: (example_input(),), {"recipe": "bitsfusion", "target_bits": 2.5, "keep": ()}),
    "uniform": (tiny_model, lambda: (example_input(),), {"recipe": "uniform", "bits": 3, "keep": ("6",)}),
    "trilevel": (residual_mlp, lambda: {"input": torch.randn(2, 8, generator=torch.Generator().manual_seed(2))},
                 {"recipe": "trilevel", "cost": "params", "budget": 0.5, "scorer": "magnitude", "rounds": 1,
                  "channel_group": 16}),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_same_seed_gives_a_byte_identical_artifact(name, tmp_path):
    build, inputs, settings = RUNS[name]
    for run in ("one", "two"):
        result = fxpress.compress(build(), inputs(), **settings)
        fxpress.save(result, tmp_path / run)
    one, two = file_hashes(tmp_path / "one"), file_hashes(tmp_path / "two")
    assert set(one) == {"manifest.json", "tensors.safetensors", "bits_per_layer.png"} and one == two


def test_wall_times_stay_out_of_the_saved_report():
    assert all(is_wall_time(k) for k in ("seconds", "latency_before_s", "fit_seconds", "measured_speedup"))
    assert not any(is_wall_time(k) for k in ("steps", "params_after", "loss_last", "layers"))
    result = fxpress.compress(tiny_model(), (example_input(),), "uniform", bits=4, keep=())
    saved, timed = result.report.to_json(), result.report.to_json(timings=True)
    assert all("seconds" in p for p in timed) and not any("seconds" in p for p in saved)
