"""LoRA files: a LoRA trained and saved by peft loads into fxpress and matches; fxpress writes peft and diffusers
layouts that read back; bad files are refused with the keys listed and nothing changed."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from fxpress.errors import RecipeError
from fxpress.frontends.capture import capture
from fxpress.passes.pipeline import Pipeline
from fxpress.passes.rewire.branches import registry
from fxpress.passes.rewire.lora import InsertLoRA
from fxpress.passes.rewire.lora_files import load_lora, save_lora


def first(out):
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)



def test_a_lora_trained_and_saved_by_peft_loads_and_matches(tiny_unet, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from peft import LoraConfig, get_peft_model

    model, example = tiny_unet
    base = copy.deepcopy(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                        init_lora_weights=True)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    target = torch.randn_like(first(model(**example.kwargs)), generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        for _ in range(3):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(first(peft_model(**example.kwargs)), target)
            loss.backward()
            optimizer.step()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = first(peft_model(**example.kwargs))
        plain = first(base(**example.kwargs))
    assert (expected - plain).abs().max() > 1e-3  # the adapter trained

    graph = capture(base, example.args, example.kwargs)
    loaded = load_lora(graph, tmp_path / "adapter", name="peft_style")
    entry = registry(loaded)["peft_style"]
    assert entry["rank"] == 4 and entry["alpha"] == 8.0 and len(entry["targets"]) > 10
    out = first(loaded.run())
    assert float((out - expected).abs().max()) <= 1e-5
    assert registry(graph) == {}  # the graph it was loaded into is unchanged


@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_fxpress_lora_files_round_trip(tiny_unet, tmp_path, layout):
    model, example = tiny_unet
    graph = capture(copy.deepcopy(model), example.args, example.kwargs)
    rewired, _ = Pipeline([InsertLoRA(["to_q", "to_v", "type:Conv2d"], rank=3, alpha=6, name="style")]).run(graph)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path in registry(rewired)["style"]["targets"]:
            b = rewired.module.get_submodule(path).lora_B.weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    target = tmp_path / ("adapter" if layout == "peft" else "lora.safetensors")
    save_lora(rewired, "style", target, format=layout)
    if layout == "peft":
        keys = load_file(target / "adapter_model.safetensors")
        assert all(k.startswith("base_model.model.") and ".lora_" in k for k in keys)
        assert json.loads((target / "adapter_config.json").read_text())["lora_alpha"] == 6
    else:
        assert all(k.startswith("unet.") for k in load_file(target))
    again = load_lora(capture(copy.deepcopy(model), example.args, example.kwargs), target, name="style")
    assert registry(again)["style"]["alpha"] == 6
    assert torch.equal(first(again.run()), first(rewired.run()))


def test_bad_lora_files_are_refused_with_their_keys(tiny_unet, tmp_path):
    model, example = tiny_unet
    graph = capture(copy.deepcopy(model), example.args, example.kwargs)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = graph.module.get_submodule(path)
    a, b = torch.zeros(2, layer.in_features), torch.zeros(layer.out_features, 2)
    cases = {
        "unknown": ({f"{path}.lora_A.weight": a, f"{path}.lora_B.weight": b, "something.else": a.clone()},
                    r"1 key\(s\) that are not LoRA factors: something\.else"),
        "foreign": ({f"{path}.lora_A.weight": a, f"{path}.lora_B.weight": b, "no.such.layer.lora_A.weight": a.clone()},
                    r"for layers this model does not have: no\.such\.layer\.lora_A\.weight"),
        "missing": ({f"{path}.lora_A.weight": a}, r"missing a factor: .*to_q \(lora_B\)"),
        "shape": ({f"{path}.lora_A.weight": torch.zeros(2, 3), f"{path}.lora_B.weight": b},
                  r"lora_A has shape \(2, 3\)"),
    }
    for name, (tensors, message) in cases.items():
        file = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(file))
        with pytest.raises(RecipeError, match=message):
            load_lora(graph, file)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RecipeError, match="not a readable safetensors file"):
        load_lora(graph, tmp_path / "junk.safetensors")
    assert registry(graph) == {} and not any("lora" in n for n, _ in graph.module.named_modules())
