"""Train an image adapter beside a control map for 3 steps on the digits UNet and save its parameters;
run alone and under torchrun by test_identity_task.py (not a test module itself)."""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from fxpress.frontends import zoo
from fxpress.frontends.capture import capture
from fxpress.passes.context import PassContext
from fxpress.passes.pipeline import Pipeline
from fxpress.passes.rewire.branches import branch_modules
from fxpress.passes.rewire.image_adapter import InsertImageAdapter
from fxpress.passes.rewire.train import AdapterConfig, TrainBranches
from fxpress.training.diffusion_data import DiffusionData


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    entry = zoo.get("testbed-digits-unet")
    example, data = entry.example_inputs(), entry.training_data()
    graph = capture(copy.deepcopy(entry.build()), example.args, example.kwargs)
    count = 64
    images = data.samples[:count]
    features = images.flatten(1) @ torch.randn(images[0].numel(), 16, generator=torch.Generator().manual_seed(1))
    train = DiffusionData(images, data.conditions[:count], data.unconditional, data.scheduler,
                          inputs={"image_embeds": features}, null_inputs={"image_embeds": torch.zeros(1, 16)})
    adapted = Pipeline([InsertImageAdapter(16, tokens=2, name="identity")]).run(graph)[0]
    before = {p: adapted.module.get_submodule(p).state_dict() for p in branch_modules(adapted, "identity")}
    trained, report = Pipeline([TrainBranches(AdapterConfig(steps=3, batch=8, lr=1e-3, ema=0.5))]).run(
        adapted, PassContext(training_data=train))
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        state, moved = {}, 0.0
        for path in branch_modules(trained, "identity"):
            for key, value in trained.module.get_submodule(path).state_dict().items():
                state[f"{path}.{key}"] = value.detach().contiguous()
                moved += float((value - before[path][key]).abs().sum())
        save_file(state, str(out / "adapter.safetensors"))
        details = report.passes[0].details
        (out / "report.json").write_text(json.dumps({"world_size": details["world_size"], "moved": moved}))


if __name__ == "__main__":
    main()
