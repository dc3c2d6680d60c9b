"""Adapter rewiring: the layer selector, LoRA insertion, scale, strip and fuse (float and low-bit bases)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fxpress
from fxpress.errors import RecipeError
from fxpress.frontends import zoo
from fxpress.frontends.capture import capture
from fxpress.ir.select import Selector, plain_path, select
from fxpress.kernels.lora import LoRA
from fxpress.passes.pipeline import Pipeline
from fxpress.passes.rewire.branches import BRANCH_META, registry, set_branch_scale
from fxpress.passes.rewire.fuse import FuseLoRA, UnfuseLoRA
from fxpress.passes.rewire.lora import InsertLoRA
from fxpress.passes.rewire.strip import StripBranches

ATTN = r"attn\d\.to_(q|k|v|out\.0)"


def first(out):
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", getattr(out, "last_hidden_state", out))


def captured(name: str):
    entry = zoo.get(name)
    model, example = entry.build(), entry.example_inputs()
    return capture(model, example.args, example.kwargs), example


def train_branch(graph, name: str, seed: int = 0) -> None:
    """Give the branch's B factors random values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path in registry(graph)[name]["targets"]:
            b = graph.module.get_submodule(path).lora_B.weight
            b.copy_(torch.randn(b.shape, generator=gen).to(b.dtype) * 0.05)


# --- selector ---------------------------------------------------------------------------------------------

def test_selector_forms():
    cands = {"down.0.attn1.to_q": ("Linear", "linear"), "down.0.attn1.to_k": ("Linear", "linear"),
             "conv_in": ("Conv2d", "conv2d"), "_orig_mod.mid.proj": ("Linear", "linear")}
    assert list(select(["to_q"], cands)) == ["down.0.attn1.to_q"]
    assert list(select([r"attn1\.to_(q|k)"], cands)) == ["down.0.attn1.to_q", "down.0.attn1.to_k"]
    assert list(select(["re:down\\..*"], cands)) == ["down.0.attn1.to_q", "down.0.attn1.to_k"]
    assert list(select(["glob:down.*.to_?"], cands)) == ["down.0.attn1.to_q", "down.0.attn1.to_k"]
    assert list(select(["type:Conv2d"], cands)) == ["conv_in"]
    assert list(select(["kind:conv2d"], cands)) == ["conv_in"]
    assert list(select(["mid.proj"], cands)) == ["_orig_mod.mid.proj"]  # torch.compile's prefix ignored
    assert plain_path("module._orig_mod.a.b") == "a.b"
    assert not Selector.parse("to_q").matches("down.0.attn1.to_qx")


def test_selector_errors_name_the_pattern_and_near_paths():
    cands = {"down.0.attn1.to_q": ("Linear", "linear"), "down.0.attn1.to_k": ("Linear", "linear")}
    with pytest.raises(RecipeError, match=r"'to_qq' matches nothing; closest module paths: down\.0\.attn1\.to_q"):
        select(["to_qq"], cands)
    with pytest.raises(RecipeError, match="not a valid regular expression"):
        select(["to_(q"], cands)
    with pytest.raises(RecipeError, match="module types here: Linear"):
        select(["type:Conv"], cands)


# --- insert / scale / strip -------------------------------------------------------------------------------

TARGETS = {"tiny-unet": ["to_q", "to_k", "to_v", "to_out.0", "type:Conv2d"],
           "dit-s": ["to_q", "to_k", "to_v", r"proj_out_\d", "kind:conv2d"],
           "clip-text": ["q_proj", "k_proj", "v_proj", "fc1"]}


@pytest.mark.parametrize("name", list(TARGETS))
def test_lora_at_zero_init_is_bit_identical_and_strip_restores(name):
    graph, example = captured(name)
    reference = first(graph.run())
    rewired, report = Pipeline([InsertLoRA(TARGETS[name], rank=4, name="style")], verify=True).run(graph)
    assert report.passes[0].rel_error == 0.0
    assert torch.equal(first(rewired.run()), reference)
    entry = registry(rewired)["style"]
    assert entry["targets"] and all(isinstance(rewired.module.get_submodule(p), LoRA) for p in entry["targets"])
    marked = [n for n in rewired.graph_module.graph.nodes if n.meta.get(BRANCH_META) == "style"]
    assert len([n for n in marked if n.op == "placeholder"]) == 3 * len(entry["targets"])  # A, B, scale
    branch_layers = [p for p, a in rewired.annotations().items() if a.branch is not None]
    assert len(branch_layers) == 2 * len(entry["targets"])
    assert all(rewired.annotation(p).branch.role == "adapter" for p in branch_layers)

    train_branch(rewired, "style")
    assert not torch.equal(first(rewired.run()), reference)
    set_branch_scale(rewired, "style", 0.0)
    at_zero = first(rewired.run())
    assert torch.equal(at_zero, reference)
    stripped, _ = Pipeline([StripBranches(role="adapter")]).run(rewired)
    assert torch.equal(first(stripped.run()), at_zero)
    assert not any(isinstance(m, LoRA) for m in stripped.module.modules())
    assert not any(n.meta.get(BRANCH_META) for n in stripped.graph_module.graph.nodes)
    assert "lora" not in str(stripped.graph_module.graph)
    assert registry(stripped) == {}


def test_scale_changes_the_captured_program_without_recapture(tiny_unet):
    model, example = tiny_unet
    graph = capture(copy.deepcopy(model), example.args, example.kwargs)
    rewired, _ = Pipeline([InsertLoRA(["to_q", "to_v"], rank=2)]).run(graph)
    train_branch(rewired, "lora")
    program = torch.export.export(rewired.module, example.args, example.kwargs, strict=False)
    full = first(program.module()(*example.args, **example.kwargs))
    set_branch_scale(rewired, "lora", 0.5)
    program_state = program.module()
    for key, value in rewired.module.state_dict().items():  # the exported program reads the same buffers
        if key.endswith(".scale") and key in dict(program_state.named_buffers()):
            dict(program_state.named_buffers())[key].copy_(value)
    half = first(program_state(*example.args, **example.kwargs))
    assert torch.allclose(first(rewired.module(*example.args, **example.kwargs)), half, atol=1e-5)
    assert not torch.allclose(full, half)
    assert registry(rewired)["lora"]["scale"] == 0.5


def test_a_stripped_low_bit_model_exports_to_onnx_without_a_trace_of_the_branch(tiny_compressed, tmp_path):
    import onnx

    from fxpress.backends.onnx import compare_with_onnxruntime, export_onnx

    rewired, _ = Pipeline([InsertLoRA(["to_q", "to_k"], rank=2, name="shortcut", role="train_only")]).run(
        tiny_compressed.graph)
    train_branch(rewired, "shortcut")
    stripped, _ = Pipeline([StripBranches()]).run(rewired)
    example = stripped.example
    path = tmp_path / "stripped.onnx"
    export_onnx(stripped, example, path)
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer]
    assert names and not any("lora" in n.lower() for n in names)
    errors = compare_with_onnxruntime(stripped.module, example, path)
    plain = first(tiny_compressed.graph.run())
    assert torch.equal(first(stripped.run()), plain)
    assert errors["exact"] <= 1e-4, errors


def test_strip_refuses_kept_adapters_unless_said(tiny_unet):
    model, example = tiny_unet
    graph = capture(copy.deepcopy(model), example.args, example.kwargs)
    rewired, _ = Pipeline([InsertLoRA(["to_q"], rank=2, name="style"),
                           InsertLoRA(["to_k"], rank=2, name="shortcut", role="train_only")]).run(graph)
    with pytest.raises(RecipeError, match=r"refuses 'style' is 'adapter'; say role='adapter'"):
        StripBranches(names=["style"]).run(rewired)
    with pytest.raises(RecipeError, match=r"no branch named 'nope'; the model has 'style', 'shortcut'"):
        StripBranches(names=["nope"]).run(rewired)
    stripped = StripBranches().run(rewired).graph  # train_only by default
    assert list(registry(stripped)) == ["style"]


def test_insert_errors(tiny_unet):
    model, example = tiny_unet
    graph = capture(copy.deepcopy(model), example.args, example.kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=r"LoRA target 'to_qq' matches nothing; closest module paths: .*to_q"):
        InsertLoRA(["to_qq"]).run(graph)
    with pytest.raises(RecipeError, match="rank must be a positive integer"):
        InsertLoRA(["to_q"], rank=0)
    rewired, _ = Pipeline([InsertLoRA(["to_q"], rank=2)]).run(graph)
    with pytest.raises(RecipeError, match="already has a branch named 'lora'"):
        InsertLoRA(["to_k"]).run(rewired)
    with pytest.raises(RecipeError, match="branch scale must be a finite number"):
        set_branch_scale(rewired, "lora", float("nan"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched


# --- fuse -------------------------------------------------------------------------------------------------

def test_fuse_float_is_within_1e6_and_unfuse_restores(tiny_unet):
    model, example = tiny_unet
    graph = capture(copy.deepcopy(model), example.args, example.kwargs)
    rewired, _ = Pipeline([InsertLoRA(["to_q", "to_out.0", "type:Conv2d"], rank=4)]).run(graph)
    train_branch(rewired, "lora")
    unfused = first(rewired.run())
    targets = registry(rewired)["lora"]["targets"]
    weights = {p: rewired.module.get_submodule(p).base_layer.weight.clone() for p in targets}
    fused, report = Pipeline([FuseLoRA()]).run(rewired)
    out = first(fused.run())
    assert float((out - unfused).norm() / unfused.norm()) <= 1e-6
    calls = [n for n in fused.graph_module.graph.nodes if n.op == "call_function"]
    assert calls and not any(n.meta.get(BRANCH_META) for n in calls)  # the fused program runs no branch
    restored, _ = Pipeline([UnfuseLoRA()]).run(fused)
    for path, before in weights.items():
        after = restored.module.get_submodule(path).base_layer.weight
        ulp = float(torch.finfo(torch.float32).eps * before.abs().max())
        assert torch.allclose(after, before, rtol=0, atol=2 * ulp)
    back = first(restored.run())  # weights within 2 ulp, so the output within float rounding of them
    assert float((back - unfused).norm() / unfused.norm()) <= 1e-6


def test_fuse_into_lowbit_stays_within_its_quantization_error(tiny_compressed, tmp_path):
    rewired, _ = Pipeline([InsertLoRA(["to_q", "to_k", "to_v", "proj_in"], rank=4)]).run(tiny_compressed.graph)
    train_branch(rewired, "lora")
    fused, report = Pipeline([FuseLoRA()]).run(rewired)
    layers = report.passes[0].details["layers"]
    lowbit = {p: r for p, r in layers.items() if r["base"] == "low-bit"}
    assert lowbit
    for path, row in lowbit.items():
        assert row["quantization_error"] is not None
        assert row["fuse_error"] <= row["quantization_error"], path
    entry = registry(fused)["lora"]
    assert entry["fused"] and set(entry["merged"]) == set(lowbit)
    with pytest.raises(RecipeError, match="cannot be unfused"):
        UnfuseLoRA().run(fused)
    base_dir = fxpress.save(tiny_compressed.graph, tmp_path / "base")["path"]  # both saved as Graphs
    fused_dir = fxpress.save(fused, tmp_path / "fused")["path"]
    from fxpress.ir.artifact import artifact_bytes
    assert abs(artifact_bytes(fused_dir) / artifact_bytes(base_dir) - 1) <= 0.01
    loaded = fxpress.load(fused_dir)
    example = tiny_compressed.graph.example
    assert torch.equal(first(loaded(*example.args, **example.kwargs)), first(fused.run()))


def test_lora_artifact_round_trip_keeps_branches_and_scale(tiny_compressed, tmp_path):
    rewired, _ = Pipeline([InsertLoRA(["to_q", "to_v"], rank=2, name="style")]).run(tiny_compressed.graph)
    train_branch(rewired, "style")
    set_branch_scale(rewired, "style", 0.7)
    path = fxpress.save(rewired, tmp_path / "rewired")["path"]
    loaded = fxpress.load(path)
    example = rewired.example
    assert torch.equal(first(loaded(*example.args, **example.kwargs)), first(rewired.run()))
    assert loaded.fxpress_branches["style"]["scale"] == 0.7
    set_branch_scale(loaded, "style", 0.0)
    plain = fxpress.load(fxpress.save(tiny_compressed, tmp_path / "plain")["path"])
    assert torch.equal(first(loaded(*example.args, **example.kwargs)), first(plain(*example.args, **example.kwargs)))
    again = capture(loaded, example.args, example.kwargs)
    assert registry(again)["style"]["targets"] == registry(rewired)["style"]["targets"]
    marked = sum(1 for a in again.annotations().values() if a.branch is not None)
    assert marked == 2 * len(registry(rewired)["style"]["targets"])


# --- command line -----------------------------------------------------------------------------------------

def test_cli_rewire_strip_fuse_and_inspect(tiny_artifact, tmp_path, capsys):
    from fxpress.cli import main

    lora = tmp_path / "lora"
    assert main(["rewire", str(tiny_artifact), "--lora", r"attn\d\.to_(q|v)", "--rank", "4", "--name", "style",
                 "--out", str(lora)]) == 0
    shortcut = tmp_path / "shortcut"
    assert main(["rewire", str(lora), "--lora", "to_k", "--rank", "2", "--name", "shortcut", "--role",
                 "train_only", "--out", str(shortcut)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(shortcut)]) == 0
    table = capsys.readouterr().out
    assert "style" in table and "shortcut" in table and "train_only" in table and "rank 4" in table
    stripped = tmp_path / "stripped"
    assert main(["strip", str(shortcut), "--out", str(stripped)]) == 0
    assert list(json.loads((stripped / "manifest.json").read_text())["branches"]) == ["style"]
    fused = tmp_path / "fused"
    assert main(["fuse", str(stripped), "--out", str(fused)]) == 0
    manifest = json.loads((fused / "manifest.json").read_text())
    assert manifest["branches"]["style"]["fused"] and manifest["branches"]["style"]["merged"]
    before = json.loads((tiny_artifact / "manifest.json").read_text())
    assert manifest["lowbit_layers"].keys() == before["lowbit_layers"].keys()  # still low-bit, layer for layer
    assert manifest["summary"]["weights_only_bits"] == before["summary"]["weights_only_bits"]
    bad = tmp_path / "bad"
    assert main(["rewire", str(tiny_artifact), "--lora", "to_qq", "--out", str(bad)]) == 2
    assert main(["strip", str(shortcut), "--role", "train_only", "--names", "style", "--out", str(bad)]) == 2
    assert main(["strip", str(shortcut), "--names", "nope", "--out", str(bad)]) == 2
    assert main(["fuse", str(tmp_path), "--out", str(bad)]) == 2
    assert not bad.exists()


def test_a_stripped_model_compresses_like_any_model(tiny_unet):
    model, example = tiny_unet
    graph = capture(copy.deepcopy(model), example.args, example.kwargs)
    rewired, _ = Pipeline([InsertLoRA(["to_q"], rank=2, name="shortcut", role="train_only")]).run(graph)
    stripped, _ = Pipeline([StripBranches()]).run(rewired)
    result = fxpress.compress(stripped.module, example, "uniform", target_bits=4)
    assert result.summary["weights_only_bits"] <= 4.0
    assert not any("lora" in p for p in result.graph.layers)
