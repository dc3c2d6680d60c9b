"""What keeps TriLevelPrune fast and visible: block replay, local order of large families, progress bars."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch

from fxpress.frontends.capture import capture
from fxpress.ir.dependency import dependency_groups
from fxpress.ir.graph import Inputs
from fxpress.passes.prune.batching import merge_inputs
from fxpress.passes.prune.bypass import find_stream_args, validate_bypass
from fxpress.passes.prune.candidates import build_candidates, masked
from fxpress.passes.prune.local import local_scores
from fxpress.passes.prune.moves import joint_calls, plan_moves
from fxpress.passes.prune.schedule import PruneConfig, greedy_prune
from fxpress.passes.prune.scores import DistillTarget, kd_scores
from fxpress.passes.prune.validate import validate_groups


@pytest.fixture(scope="module")
def small_dit():
    """A 4-block DiT (the zoo's DiT-S code at a toy size), two calibration inputs, its checked candidates."""
    from diffusers import DiTTransformer2DModel

    from fxpress.frontends.zoo import DIT_S_CONFIG

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**{**DIT_S_CONFIG, "num_layers": 4, "num_attention_heads": 2,
                                     "attention_head_dim": 16, "sample_size": 8}).eval().requires_grad_(False)
    inputs = [{"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([t, 500]),
               "class_labels": torch.tensor([1, 2])} for t in (10, 900)]
    graph = capture(model, (), inputs[0])
    graph.calibration = [Inputs((), kw) for kw in inputs]
    with torch.no_grad():
        groups = validate_groups(model, dependency_groups(graph), inputs[:1])
        streams, _ = find_stream_args(model, [f"transformer_blocks.{i}" for i in range(4)], inputs[0])
        streams, _ = validate_bypass(model, streams, inputs[:1])
    cands = build_candidates(model, groups, list(streams), channel_group=16)
    return model, inputs, graph, streams, cands


def _ffn_calls(model) -> tuple[list[int], list]:
    """Count the runs of each block's last FFN layer (it does not run when its block is replayed)."""
    calls = [0]
    handles = [b.ff.net[2].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for b in model.transformer_blocks]
    return calls, handles


def test_replayed_blocks_give_the_same_kd_scores_with_fewer_block_forwards(small_dit):
    model, inputs, _, streams, cands = small_dit
    target = DistillTarget(copy.deepcopy(model), inputs)
    calls, handles = _ffn_calls(model)
    fast = kd_scores(model, cands, target, streams)
    replayed_calls = calls[0]
    base = target.loss(model)
    calls[0] = 0
    slow = {}
    for cand in cands:  # the same losses with every block run
        with masked(model, [cand], streams):
            slow[cand.name] = target.loss(model) - base
    full_calls = calls[0]
    for handle in handles:
        handle.remove()
    assert fast == pytest.approx(slow, rel=1e-6, abs=1e-9)
    assert any(v > 0 for v in fast.values())
    assert target.runs == 1  # the two inputs run as one batch
    assert full_calls == len(cands) * 4  # every candidate, four blocks
    assert replayed_calls < 0.75 * full_calls  # the blocks before each candidate were not run


def test_local_score_is_the_reading_layers_output_change(small_dit):
    model, inputs, _, _, cands = small_dit
    ffn = [c for c in cands if c.family is not None and c.family.name == "transformer_blocks.1.ff.net.0.proj"]
    heads = [c for c in cands if c.level == "head"]
    scores = local_scores(model, ffn + heads, inputs)
    assert set(scores) == {c.name for c in ffn + heads} and all(v > 0 for v in scores.values())
    fc2 = model.transformer_blocks[1].ff.net[2]
    seen = []
    handle = fc2.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        for kw in inputs:
            model(**kw)
    handle.remove()
    cand = ffn[3]
    expected = 0.0
    with masked(model, [cand], {}), torch.no_grad():
        for x, out in seen:
            expected += float((fc2(x) - out).square().mean() / out.square().mean()) / len(inputs)
    assert scores[cand.name] == pytest.approx(expected, rel=1e-4)


def test_order_only_scores_price_every_depth_by_joint_kd(small_dit):
    _, _, _, _, cands = small_dit
    heads = [c for c in cands if c.family is not None and c.family.name == cands[-1].family.name]
    scores = {c.name: float(i) for i, c in enumerate(heads)}
    rank = {c.name: 1.0 for c in heads}
    asked: list[int] = []

    def joint(taken):
        asked.append(len(taken))
        return float(len(taken))

    plan_moves(heads, scores, rank, joint, order_only=True)
    assert asked[0] == 1 and len(asked) == joint_calls(heads, scores, rank, order_only=True)
    asked.clear()
    plan_moves(heads, scores, rank, joint)
    assert 1 not in asked  # a KD score alone is the first depth's price


def test_inputs_run_as_one_batch_only_when_the_teacher_agrees(small_dit):
    model, inputs, _, _, _ = small_dit
    batched = DistillTarget(model, inputs)
    one_by_one = DistillTarget(model, inputs)
    one_by_one.merged = None
    student = copy.deepcopy(model)
    with torch.no_grad():
        student.transformer_blocks[2].ff.net[2].weight.mul_(0.5)
    assert batched.runs == 1 and one_by_one.runs == len(inputs)
    assert batched.loss(student) == pytest.approx(one_by_one.loss(student), rel=1e-5)

    class MixesRows(torch.nn.Module):  # each row sees the batch mean: rows of a batch are not independent
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

        def forward(self, x):
            return self.layers[0](x - x.mean(0, keepdim=True))

    rows = [{"x": torch.randn(2, 4)}, {"x": torch.randn(2, 4) + 3.0}]
    assert DistillTarget(MixesRows(), rows).runs == 2
    assert merge_inputs([{"x": torch.ones(2, 3)}, {"x": torch.ones(2, 4)}]) is None  # other trailing shapes
    scalar_t = [{"x": torch.ones(2), "t": torch.tensor(1)}, {"x": torch.ones(2), "t": torch.tensor(2)}]
    assert merge_inputs(scalar_t) is None  # a 0-d tensor has no batch to concatenate
    assert merge_inputs([{"x": torch.ones(2), "flag": True}, {"x": torch.ones(2), "flag": False}]) is None
    merged, sizes = merge_inputs([{"x": torch.ones(2, 3), "flag": True}, {"x": torch.zeros(1, 3), "flag": True}])
    assert sizes == [2, 1] and merged["x"].shape == (3, 3) and merged["flag"] is True


@contextmanager
def _recording_bars(monkeypatch):
    """Replace every pruning progress bar by one that records (description, total, steps advanced)."""
    from fxpress.passes.prune import choose, costs, schedule

    bars: list[list] = []

    @contextmanager
    def bar(description, total):
        record = [description, total, 0]
        bars.append(record)

        def advance(n=1, description=None):
            record[2] += n
        yield advance

    for module in (choose, costs, schedule):
        monkeypatch.setattr(module, "progress_bar", bar)
    yield bars


def test_every_kd_phase_shows_a_bar_that_runs_to_its_total(small_dit, monkeypatch):
    model, _, graph, _, _ = small_dit
    config = PruneConfig(cost="flops", budget=0.7, scorer="kd", rounds=2, channel_group=16)
    with _recording_bars(monkeypatch) as bars:
        result = greedy_prune(graph, config)
    assert result.met and len(result.rounds) == 2
    names = [b[0] for b in bars]
    for phase in ("capturing the model", "dependency groups", "KD score of each candidate",
                  "joint KD of each family"):
        assert sum(phase in name for name in names) >= 2, phase  # once per round at least
    assert all(done == total for _, total, done in bars), bars
    scored = [b for b in bars if "KD score of each candidate" in b[0]]
    assert scored[0][1] == result.rounds[0].candidates  # few candidates: each is scored alone
    assert all(r.scoring == "kd" and r.kd_losses > r.candidates for r in result.rounds)


def test_past_the_limit_families_are_ordered_locally_with_far_fewer_kd_losses(small_dit, monkeypatch):
    _, _, graph, _, cands = small_dit
    each = greedy_prune(graph, PruneConfig(cost="flops", budget=0.7, scorer="kd", rounds=1, channel_group=16))
    with _recording_bars(monkeypatch) as bars:
        local = greedy_prune(graph, PruneConfig(cost="flops", budget=0.7, scorer="kd", rounds=1, channel_group=16,
                                                kd_each_limit=0))
    assert each.rounds[0].scoring == "kd" and local.rounds[0].scoring == "kd+local"
    assert local.met and local.rounds[0].removed
    assert local.rounds[0].kd_losses < 0.5 * each.rounds[0].kd_losses
    alone = next(b for b in bars if "KD score of each candidate" in b[0])
    assert alone[1] == sum(c.level == "block" for c in cands)  # only blocks are scored alone
    with torch.no_grad():
        assert torch.isfinite(local.model(**graph.calibration[0].kwargs).sample).all()


def test_nothing_is_printed_when_quiet(small_dit, capfd, monkeypatch):
    """Under FXPRESS_QUIET (the test suite's setting, what --quiet sets) the bars and round lines stay silent."""
    _, _, graph, _, _ = small_dit
    monkeypatch.setenv("FXPRESS_QUIET", "1")
    capfd.readouterr()
    greedy_prune(graph, PruneConfig(cost="flops", budget=0.8, scorer="magnitude", rounds=2, channel_group=16))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
