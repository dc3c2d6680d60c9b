"""Candidates, KD / magnitude / random scores, cost models and the greedy scheduler on a real DiT."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fxpress.errors import RecipeError
from fxpress.frontends.capture import capture
from fxpress.ir.dependency import dependency_groups
from fxpress.ir.graph import Inputs
from fxpress.passes.prune.candidates import build_candidates
from fxpress.passes.prune.costs import build_cost_model, candidate_cost
from fxpress.passes.prune.remove import mask_units
from fxpress.passes.prune.schedule import PruneConfig, greedy_prune
from fxpress.passes.prune.scores import DistillTarget, kd_scores, magnitude_scores, random_scores


@pytest.fixture(scope="module")
def dit():
    """The digits-testbed DiT with every weight drawn at random, calibration inputs at three timesteps."""
    from fxpress.testbed import build_testbed
    from fxpress.testbed.training_data import noisy_inputs

    testbed = build_testbed("digits-dit")
    model = testbed.denoiser.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    inputs = noisy_inputs(testbed, [100, 500, 900], 0)
    graph = capture(model, (), inputs[0])
    return model, inputs, graph, dependency_groups(graph)


def test_channel_candidates_group_units_by_magnitude(dit):
    model, _, _, groups = dit
    cands = build_candidates(model, groups, [], levels=("channel",), channel_group=32)
    ffn = [c for c in cands if c.family.name == "transformer_blocks.0.ff.net.0.proj"]
    assert len(ffn) == 12 and all(len(c.units) == 32 for c in ffn)  # 384 channels in groups of 32
    fc2 = model.transformer_blocks[0].ff.net[2].weight
    energy = [float(fc2[:, [u.slices[("transformer_blocks.0.ff.net.2.weight", 1)][0] for u in c.units]]
                    .square().mean()) for c in ffn]
    assert energy[0] < energy[-1]  # the first group holds the smallest channels


def test_kd_score_is_zero_for_a_unit_that_does_nothing(dit):
    model, inputs, _, groups = dit
    model = copy.deepcopy(model)
    cands = build_candidates(model, groups, [], levels=("head",))[:8]
    dead = cands[5]
    mask_units(model, dead.units)  # this head already contributes nothing
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    scores = kd_scores(model, cands, DistillTarget(model, inputs), {})
    assert scores[dead.name] == 0.0
    assert all(v > 0 for k, v in scores.items() if k != dead.name)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # every mask was undone


def test_scores_of_every_kind_cover_every_candidate(dit):
    model, _, _, groups = dit
    cands = build_candidates(model, groups, ["transformer_blocks.0"], channel_group=64)
    assert {c.level for c in cands} == {"block", "head", "channel"}
    for scores in (magnitude_scores(model, cands), random_scores(cands, 3)):
        assert set(scores) == {c.name for c in cands} and all(v >= 0 for v in scores.values())
    assert random_scores(cands, 3) == random_scores(cands, 3)


def test_magnitude_scores_do_not_depend_on_a_layers_scale(dit):
    """Scaling a layer (an embedding at N(0, 1) beside linears at 1/fan_in) leaves its units' scores alone."""
    model, _, _, groups = dit
    cands = build_candidates(model, groups, ["transformer_blocks.0"], channel_group=64)
    before = magnitude_scores(model, cands)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for p in scaled.transformer_blocks[1].ff.parameters():
            p.mul_(100.0)
    after = magnitude_scores(scaled, cands)
    assert all(after[k] == pytest.approx(v, rel=1e-4) for k, v in before.items())
    assert after["block transformer_blocks.0"] == 1.0
    ffn = [v for k, v in before.items() if k.startswith("transformer_blocks.1.ff.net.0.proj [")]
    assert ffn == sorted(ffn) and ffn[0] < 1.0 < ffn[-1]  # groups in magnitude order, around their tensors' mean


def test_costs_count_what_a_candidate_removes(dit):
    model, _, graph, groups = dit
    cands = build_candidates(model, groups, ["transformer_blocks.2"], channel_group=32)
    params, flops = build_cost_model(graph, "params"), build_cost_model(graph, "flops")
    ffn = next(c for c in cands if c.family and c.family.name == "transformer_blocks.1.ff.net.0.proj")
    assert candidate_cost(params, ffn) == 32 * (96 + 1) + 32 * 96  # fc1 rows with bias, fc2 columns
    block = next(c for c in cands if c.level == "block")
    assert candidate_cost(params, block) == sum(p.numel() for p in model.transformer_blocks[2].parameters())
    head = next(c for c in cands if c.level == "head" and "blocks.1.attn1" in c.name)
    layer_flops = sum(graph.layers[f"transformer_blocks.1.attn1.{p}"].flops for p in ("to_q", "to_k", "to_v",
                                                                                   "to_out.0"))
    assert candidate_cost(flops, head) > layer_flops / 4  # its share of the projections plus of the attention
    latency = build_cost_model(graph, "latency", repeats=2)
    weighted = set(latency.per_node) - latency.other_nodes
    assert weighted and all(latency.per_node[n] > 0 for n in weighted)
    assert latency.other_nodes  # norms, activations, modulations are timed too
    inside = latency.module_nodes["transformer_blocks.2"]
    assert candidate_cost(latency, block) == pytest.approx(sum(latency.per_node[n] for n in inside)
                                                           + latency.overhead * len(inside))
    assert latency.overhead >= 0 and latency.total > sum(latency.per_node.values()) - 1e-12


def test_latency_counts_the_activations_a_channel_group_shrinks(dit):
    """An FFN channel group saves its share of the fc1/fc2 time and of every op between them (the GELU)."""
    _, _, graph, _ = dit
    groups = dependency_groups(graph, footprints=True)
    model = graph.module
    cands = build_candidates(model, groups, [], levels=("channel",), channel_group=32)
    ffn = next(c for c in cands if c.family.name == "transformer_blocks.1.ff.net.0.proj")
    gelu = [n.name for n in graph.graph_module.graph.nodes if "gelu" in str(n.target)
            and "transformer_blocks.1.ff" in str(n.meta.get("nn_module_stack"))]
    assert len(gelu) == 1
    assert sum(u.footprint.get(gelu[0], 0.0) for u in ffn.units) == pytest.approx(32 / 384)
    assert all(set(u.footprint) <= {n.name for n in graph.graph_module.graph.nodes} for u in ffn.units)
    latency = build_cost_model(graph, "latency", repeats=2)
    assert gelu[0] in latency.other_nodes
    no_footprint = dependency_groups(graph)  # without footprints the same group saves only its layers' share
    plain = next(c for c in build_candidates(model, no_footprint, [], levels=("channel",), channel_group=32)
                 if c.family.name == ffn.family.name)
    assert candidate_cost(latency, plain) < candidate_cost(latency, ffn)


@pytest.mark.parametrize("bad", [{"budget": 1.5}, {"cost": "watts"}, {"scorer": "vibes"}, {"levels": ("layer",)},
                                 {"rank_by": "watts"}, {"latency_batch": -1}])
def test_bad_prune_configs_are_refused(bad):
    with pytest.raises(RecipeError):
        PruneConfig(**bad)


def test_greedy_prune_meets_the_flops_budget_and_keeps_the_original(dit):
    model, inputs, graph, _ = dit
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = PruneConfig(cost="flops", budget=0.5, scorer="kd", rounds=2, channel_group=128)
    graph.calibration = [Inputs((), kw) for kw in inputs]
    result = greedy_prune(graph, config)
    pruned, rounds = result.model, result.rounds
    ratio = build_cost_model(capture(pruned, (), inputs[0]), "flops").total / build_cost_model(graph, "flops").total
    assert 0.4 <= ratio <= 0.5
    assert len(rounds) == 2 and all(r.cost_after < r.cost_before for r in rounds)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.isfinite(pruned(**inputs[1]).sample).all()
    assert result.met and result.final_cost <= result.goal


def test_a_flops_budget_ranked_by_latency_meets_the_flops_budget(dit):
    model, inputs, graph, _ = dit
    graph.calibration = [Inputs((), kw) for kw in inputs]
    config = PruneConfig(cost="flops", budget=0.6, scorer="magnitude", rank_by="latency", rounds=1,
                         channel_group=128, latency_repeats=2)
    result = greedy_prune(graph, config)
    ratio = build_cost_model(capture(result.model, (), inputs[0]), "flops").total / build_cost_model(graph,
                                                                                                    "flops").total
    assert ratio <= 0.6 and result.met
    assert result.final_cost == pytest.approx(ratio * build_cost_model(graph, "flops").total)


def test_trilevel_pass_then_quantization_round_trips_through_the_artifact(dit, tmp_path):
    """Prune (a pass), then quantize (a recipe's passes) in one Pipeline; save; load; same outputs."""
    import fxpress
    from fxpress.passes.pipeline import Pipeline
    from fxpress.passes.prune.trilevel import TriLevelPrune
    from fxpress.recipes import make_recipe

    model, inputs, _, _ = dit
    graph = capture(model, (), inputs[0])
    graph.calibration = [Inputs((), kw) for kw in inputs]
    prune = TriLevelPrune(PruneConfig(cost="params", budget=0.6, scorer="magnitude", rounds=1, channel_group=128),
                          latency_repeats=2)
    result, report = Pipeline([prune, *make_recipe("uniform", bits=4).passes()]).run(graph)
    details = report.passes[0].details
    assert details["params_after"] <= 0.6 * details["params_before"] and details["removed"]
    assert details["latency_before_s"] > 0 and details["measured_speedup"] > 0
    fxpress.save(result, tmp_path / "pruned")
    loaded = fxpress.load(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs[2]).sample, result.module(**inputs[2]).sample)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in result.module.parameters())


def test_cli_trilevel_recipe_prunes_quantizes_and_saves(tmp_path):
    import fxpress
    from fxpress.cli import main
    from fxpress.frontends import zoo

    out = tmp_path / "pruned"
    recipe = tmp_path / "trilevel.toml"
    recipe.write_text('recipe = "trilevel"\nrounds = 1\nlevels = ["head", "channel"]\n')
    assert main(["compress", "tiny-unet", "--recipe", str(recipe), "--budget", "params=0.7", "--scorer",
                 "magnitude", "--rank-by", "flops", "--then", "uniform", "--out", str(out)]) == 0
    loaded = fxpress.load(out)
    original = zoo.get("tiny-unet").build()
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in original.parameters())
    with torch.no_grad():
        assert torch.isfinite(loaded(**zoo.get("tiny-unet").example_inputs().kwargs).sample).all()
    assert main(["compress", "tiny-unet", "--recipe", "trilevel", "--budget", "watts=0.5",
                 "--out", str(tmp_path / "bad")]) == 2
    assert main(["compress", "tiny-unet", "--recipe", "trilevel", "--recovery", "5",
                 "--out", str(tmp_path / "bad")]) == 2  # KD recovery needs a testbed's training data
    assert not (tmp_path / "bad").exists()


def test_kd_recovery_trains_the_pruned_trained_dit():
    """On the trained digits DiT: prune 30% of the parameters, then a few KD recovery steps lower the loss."""
    from fxpress.frontends import zoo
    from fxpress.passes.prune.recovery import recover

    entry = zoo.get("testbed-digits-dit")
    teacher, example = entry.build(), entry.example_inputs()
    graph = capture(teacher, (), example.kwargs)
    graph.calibration = [Inputs((), c.kwargs) for c in entry.calibration_inputs(2)]
    student = greedy_prune(graph, PruneConfig(cost="params", budget=0.7, scorer="magnitude", rounds=1,
                                              levels=("head", "channel"), channel_group=64)).model
    with torch.no_grad():  # the command line runs everything without gradients: recovery must still train
        losses = recover(student, teacher, entry.training_data(), 12, batch=8, lr=1e-3)
    assert len(losses) == 12 and sum(losses[-4:]) < sum(losses[:4])
    assert not any(p.requires_grad for p in student.parameters())


def test_trilevel_recipe_folds_flat_keys_and_tables_into_one_prune_config(tmp_path):
    from fxpress.recipes import make_recipe

    recipe = make_recipe("trilevel", cost="flops", budget=0.4, recovery_steps=10)
    assert recipe.prune == PruneConfig(cost="flops", budget=0.4) and recipe.trains
    toml = tmp_path / "r.toml"
    toml.write_text('recipe = "trilevel"\nscorer = "random"\n[prune]\nrounds = 2\nlevels = ["head"]\n')
    assert make_recipe(toml, budget=0.3).prune == PruneConfig(budget=0.3, scorer="random", rounds=2, levels=("head",))
    trial = make_recipe("trilevel", trial_recovery_steps=20)
    assert trial.trains and trial.passes()[0].trial_recovery_steps == 20
    for bad in ({"rounds": 0}, {"depth": 3}, {"qat": {"stage1_steps": 1}}, {"trial_recovery_steps": -1}):
        with pytest.raises(RecipeError):
            make_recipe("trilevel", **bad)


def test_a_block_the_models_own_code_reaches_into_is_refused():
    """DiT computes its final conditioning with transformer_blocks[0].norm1.emb: block 0 must stay."""
    from diffusers import DiTTransformer2DModel

    from fxpress.frontends.zoo import DIT_S_CONFIG
    from fxpress.passes.prune.bypass import find_stream_args, validate_bypass

    model = DiTTransformer2DModel(**{**DIT_S_CONFIG, "num_layers": 3, "num_attention_heads": 2,
                                     "attention_head_dim": 16, "sample_size": 8}).eval()
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10, 500]),
              "class_labels": torch.tensor([1, 2])}
    paths = [f"transformer_blocks.{i}" for i in range(3)]
    with torch.no_grad():
        streams, refused = find_stream_args(model, paths, inputs)
        assert set(streams) == set(paths) and not refused
        kept, broken = validate_bypass(model, streams, [inputs])
    assert set(kept) == {"transformer_blocks.1", "transformer_blocks.2"}
    assert "dit_transformer_2d.py" in broken["transformer_blocks.0"]
    assert "norm1" in broken["transformer_blocks.0"]


def test_latency_factors_time_narrowed_and_shortened_copies_and_leave_the_model_alone(dit):
    from fxpress.passes.prune.bypass import find_stream_args
    from fxpress.passes.prune.calibrate import FACTOR_RANGE, latency_factors
    from fxpress.passes.prune.validate import validate_groups

    model, inputs, graph, groups = dit
    groups = validate_groups(model, dependency_groups(graph, footprints=True), inputs[:1])
    streams, _ = find_stream_args(model, ["transformer_blocks.1", "transformer_blocks.2"], inputs[0])
    cands = build_candidates(model, groups, list(streams), channel_group=64)
    latency = build_cost_model(graph, "latency", repeats=2)
    seconds = {c.name: candidate_cost(latency, c) for c in cands}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    factors = latency_factors(model, cands, seconds, latency.total, streams, Inputs((), inputs[0]), turns=3)
    assert set(factors) == {"block", "head", "channel"} and factors["head"] == factors["channel"]
    assert all(FACTOR_RANGE[0] <= f <= FACTOR_RANGE[1] for f in factors.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(b).__name__ != "Bypass" for b in model.transformer_blocks)


def test_a_latency_budget_is_a_fraction_of_the_unpruned_models_measured_latency(dit):
    model, inputs, graph, _ = dit
    graph.calibration = [Inputs((), kw) for kw in inputs]
    config = PruneConfig(cost="latency", budget=0.7, scorer="magnitude", rounds=1, channel_group=128,
                         latency_repeats=3)
    result = greedy_prune(graph, config)
    assert result.goal == 0.7 and 0.0 < result.final_cost
    assert result.rounds and set(result.rounds[0].latency_factors) == {"block", "head", "channel"}
    assert result.rounds[0].cost_before == 1.0  # nothing removed yet: the whole latency, not a noisy timing


def test_latency_is_timed_at_the_batch_asked_for_and_the_pruned_graph_keeps_its_own(dit, monkeypatch):
    from fxpress.passes.prune import calibrate, schedule, trilevel
    from fxpress.passes.prune.trilevel import TriLevelPrune

    model, inputs, graph, _ = dit
    graph.calibration = [Inputs((), kw) for kw in inputs]
    batches = []
    for module in (schedule, calibrate, trilevel):
        timer = module.latencies_in_turns
        monkeypatch.setattr(module, "latencies_in_turns",
                            lambda models, example, turns, timer=timer: batches.append(example.batch_size)
                            or timer(models, example, turns))
    config = PruneConfig(cost="latency", budget=0.8, scorer="magnitude", rounds=1, channel_group=128,
                         latency_repeats=2, latency_batch=8)
    result = TriLevelPrune(config, latency_repeats=2).run(graph)
    assert len(batches) >= 3 and set(batches) == {8}  # the scheduler, its calibration and the report
    assert result.report["latency_batch"] == 8 and graph.example.batch_size == 2
    assert result.graph.example.batch_size == 2  # later passes see the model's own example inputs
    assert sum(p.numel() for p in result.graph.module.parameters()) < sum(p.numel() for p in model.parameters())


def test_plans_are_judged_after_a_trial_fine_tune_and_the_winner_is_kept(dit):
    model, inputs, graph, _ = dit
    graph.calibration = [Inputs((), kw) for kw in inputs]
    tried: list[nn.Module] = []

    def trial(candidate: nn.Module) -> None:  # stands in for a short KD recovery
        candidate.tried = len(tried)
        tried.append(candidate)

    config = PruneConfig(cost="params", budget=0.8, scorer="kd", rounds=1, channel_group=128)
    result = greedy_prune(graph, config, trial=trial)
    assert len(tried) >= 2  # every level, and plans drawn from fewer levels
    assert any(result.model is t for t in tried) and not hasattr(model, "tried")
    names = {n for r in result.rounds for names in r.removed.values() for n in names}
    blocks = {n.removeprefix("block ") for n in names if n.startswith("block ")}
    assert set(result.bypassed) == blocks
    with torch.no_grad():
        assert torch.isfinite(result.model(**inputs[1]).sample).all()


def test_masking_a_block_scores_like_removing_it(dit):
    from fxpress.passes.prune.bypass import bypass_blocks, find_stream_args

    model, inputs, _, _ = dit
    streams, _ = find_stream_args(model, ["transformer_blocks.2"], inputs[0])
    pruned = copy.deepcopy(model)
    bypass_blocks(pruned, streams)
    target = DistillTarget(model, inputs[:2])
    block = build_candidates(model, dependency_groups(capture(model, (), inputs[0])), list(streams),
                             levels=("block",))
    score = kd_scores(model, block, target, streams)[block[0].name]
    assert score > 0 and score == pytest.approx(target.loss(pruned), rel=1e-5)



def test_keep_protects_layers_from_pruning(dit):
    """A layer `keep` names is neither removed with its block nor narrowed by a head or channel cut."""
    from fxpress.recipes import make_recipe

    model, inputs, graph, _ = dit
    graph.calibration = [Inputs((), kw) for kw in inputs]
    keep = ("transformer_blocks.0.*", "transformer_blocks.1.ff.*")
    recipe = make_recipe("trilevel", cost="params", budget=0.6, scorer="magnitude", rounds=1, channel_group=128,
                         keep=keep)
    config = recipe.passes()[0].config
    assert config.keep == keep and recipe.keep == keep
    shapes = {n: p.shape for n, p in model.named_parameters()}
    unprotected = greedy_prune(graph, PruneConfig(cost="params", budget=0.6, scorer="magnitude", rounds=1,
                                                  channel_group=128))
    protected = greedy_prune(graph, config)
    def changed(result):
        now = {n: p.shape for n, p in result.model.named_parameters()}
        return {n for n in shapes if now.get(n) != shapes[n]} | {f"{b}.*" for b in result.bypassed}
    touched = lambda names: {n for n in names if n.startswith(("transformer_blocks.0.", "transformer_blocks.1.ff."))}  # noqa: E731
    assert touched(changed(unprotected))  # without keep, pruning does reach these layers: the test can fail
    assert not touched(changed(protected)) and protected.met
