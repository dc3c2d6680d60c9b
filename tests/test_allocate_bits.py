"""The allocator never goes above the target, and leaves no bits unspent that an upgrade could use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxpress
from fxpress.errors import AllocationError, RecipeError
from fxpress.ir.annotations import QuantSpec
from fxpress.passes.quant.allocate_bits import AllocateBits, solve_allocation, weights_only_bits
from fxpress.passes.quant.select_layers import SelectLayers
from fxpress.passes.sensitivity import MeasureSensitivity

OPTIONS = ("b1", "b2", "p2", "b3", "p3", "b4", "p4", "p8")


@pytest.fixture(scope="module")
def measured(tiny_unet):
    model, example = tiny_unet
    graph = fxpress.capture(model, example.args, example.kwargs)
    graph, _ = fxpress.Pipeline([SelectLayers(), MeasureSensitivity("local", OPTIONS)]).run(graph)
    return graph


@pytest.mark.parametrize("target", [1.6, 1.75, 1.99, 2.3, 3.0, 4.5, 7.9])
@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_target_met_within_tolerance_never_over(measured, target, eta):
    """7.9 was refused once ('achieved 7.8319 bits per weight for a target of 7.9000'): a target is a budget.

    The allocation minimises the score, not the unspent bits: with eta > 0 (scores divided by params**eta)
    the best allocation may spend less (7.62 of 7.9 here); the solver tests check it is maximal."""
    graph, report = fxpress.Pipeline([AllocateBits(target, options=OPTIONS, eta=eta)]).run(measured)
    achieved = weights_only_bits(graph)
    assert achieved <= target + 1e-9
    if eta == 0.0:
        assert achieved >= target - 0.1
    assert report.passes[0].details["achieved_bits"] == pytest.approx(achieved, abs=1e-4)


@pytest.mark.parametrize("seed", range(20))
def test_solver_on_random_problems(seed):
    rng = np.random.default_rng(seed)
    layers = rng.integers(3, 60)
    params = rng.integers(100, 200_000, layers).astype(np.float64)
    costs = np.tile([QuantSpec.from_key(k).cost_bits for k in OPTIONS], (layers, 1))
    scores = np.sort(rng.random((layers, len(OPTIONS))), axis=1)[:, ::-1] * rng.random((layers, 1))
    target = rng.uniform(1.7, 3.5)
    picks = solve_allocation(params, costs, scores, target * params.sum())
    achieved = (params * costs[np.arange(layers), picks]).sum() / params.sum()
    assert achieved <= target + 1e-9
    # No single upgrade that still fits the budget lowers the score: the solution is not wasteful.
    budget = target * params.sum()
    used = (params * costs[np.arange(layers), picks]).sum()
    for i in range(layers):
        for o in range(len(OPTIONS)):
            extra = params[i] * (costs[i, o] - costs[i, picks[i]])
            if extra > 0 and used + extra <= budget - 1e-3 * params.sum():
                assert scores[i, o] >= scores[i, picks[i]] - 1e-12


def test_eta_moves_bits_to_small_layers(measured):
    def small_layer_bits(eta):
        graph, _ = fxpress.Pipeline([AllocateBits(1.99, options=OPTIONS, eta=eta)]).run(measured)
        sizes = {p: graph.layers[p].weight_params for p, a in graph.annotations().items() if a.quant}
        median = np.median(list(sizes.values()))
        small = [graph.annotation(p).quant.cost_bits for p, n in sizes.items() if n < median]
        return float(np.mean(small))

    assert small_layer_bits(0.5) > small_layer_bits(0.0)


def test_byte_budget(measured):
    from fxpress.passes.quant.allocate_bits import fixed_bytes

    paths = [p for p, a in measured.annotations().items() if not a.keep_reason]
    weights = sum(measured.layers[p].weight_params for p in paths)
    budget = fixed_bytes(measured, paths) + int(weights * 2.2 / 8)
    graph, _ = fxpress.Pipeline([AllocateBits(budget_bytes=budget, options=OPTIONS, cost_model="log2")]).run(measured)
    assert 2.18 <= weights_only_bits(graph) <= 2.2 + 1e-9  # radix words cost a little over log2(levels)
    graph, report = fxpress.Pipeline([AllocateBits(budget_bytes=budget, options=OPTIONS)]).run(measured)
    details = report.passes[0].details
    assert details["cost_model"] == "stored entropy" and 2.19 <= details["achieved_bits"] <= 2.2 + 1e-9
    assert weights_only_bits(graph) > 2.2  # entropy coding buys more levels for the same bytes


def test_impossible_targets(measured):
    with pytest.raises(fxpress.PassError) as info:
        fxpress.Pipeline([AllocateBits(1.2, options=OPTIONS)]).run(measured)
    assert isinstance(info.value.__cause__, AllocationError)
    with pytest.raises(RecipeError, match=r"below the lowest possible, 1\.585 \(b1"):
        fxpress.make_recipe("bitsfusion", target_bits=1.5)
    with pytest.raises(RecipeError, match="lowest possible, 2.000"):
        fxpress.make_recipe("bitsfusion", target_bits=1.9, widths=[2, 4], grids=["plain"])
    with pytest.raises(RecipeError, match="target_bits must be a number"):
        fxpress.make_recipe("bitsfusion", target_bits=float("nan"))
    assert fxpress.make_recipe("bitsfusion", target_bits=9.0).target_bits == 9.0  # a budget above 8 bits: all 8


def _costs_of(keys):
    return np.array([QuantSpec.from_key(k).cost_bits for k in keys])


def _assert_maximal(params, costs, scores, budget, picks):
    """No layer can move to a costlier option of no higher score within what the budget has left."""
    rows = np.arange(len(picks))
    used = (params * costs[rows, picks]).sum()
    assert used <= budget * (1 + 1e-12)
    for i in rows:
        for o in range(costs.shape[1]):
            extra = params[i] * (costs[i, o] - costs[i, picks[i]])
            if extra > 0 and scores[i, o] <= scores[i, picks[i]]:
                assert used + extra > budget, (i, o, used + extra - budget)


@given(seed=st.integers(0, 2**31 - 1), layers=st.integers(1, 40), fraction=st.floats(0.0, 1.0),
       noisy=st.booleans())
@settings(max_examples=150, deadline=None, derandomize=True)
def test_any_target_between_the_narrowest_and_widest_is_met_at_or_below(seed, layers, fraction, noisy):
    """Property: inside [lowest, widest] the solver never errs, never exceeds the target and is maximal."""
    rng = np.random.default_rng(seed)
    params = rng.integers(1, 300_000, layers).astype(np.float64)
    costs = np.tile(_costs_of(OPTIONS), (layers, 1))
    scores = np.sort(rng.random((layers, len(OPTIONS))), axis=1)[:, ::-1] * rng.random((layers, 1))
    if noisy:  # measured errors are not always monotone: near-zero errors of wide options swap places
        scores = scores + rng.random(scores.shape) * 1e-3 * scores.max()
    low, high = costs.min(), costs.max()
    target = low + fraction * (high - low)
    picks = solve_allocation(params, costs, scores, target * params.sum())
    _assert_maximal(params, costs, scores, target * params.sum(), picks)


@pytest.mark.parametrize("target", [1.585, 8.0])
def test_the_ends_of_the_range_are_exact(target):
    params = np.array([1000.0, 37.0, 55_555.0])
    costs = np.tile(_costs_of(OPTIONS), (3, 1))
    scores = np.tile(np.linspace(1.0, 0.0, len(OPTIONS)), (3, 1))
    picks = solve_allocation(params, costs, scores, target * params.sum())
    achieved = (params * costs[np.arange(3), picks]).sum() / params.sum()
    assert achieved == pytest.approx(min(target, 8.0), abs=1e-3) and achieved <= max(target, 1.585) + 1e-12


@pytest.fixture(scope="module")
def measured_dit():
    """A small DiT (not a UNet): a second architecture for the target sweep."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    example = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10, 500]),
               "class_labels": torch.tensor([1, 3])}
    graph = fxpress.capture(model, (), example)
    graph, _ = fxpress.Pipeline([SelectLayers(), MeasureSensitivity("local", OPTIONS)]).run(graph)
    return graph


@pytest.mark.parametrize("which", ["measured", "measured_dit"])
def test_target_sweep_on_two_architectures(which, request):
    """Every target from 1.585 (ternary) to 8.0 in 0.1 steps allocates, at or below the target, maximally."""
    graph = request.getfixturevalue(which).copy()  # the pass only rewrites each layer's QuantSpec: reuse one copy
    targets = [*np.round(np.arange(1.585, 8.0, 0.1), 3), 8.0]
    for target in targets:
        details = AllocateBits(float(target), options=OPTIONS).run(graph).report
        achieved = weights_only_bits(graph)
        assert achieved <= target + 1e-9 and details["achieved_bits"] == pytest.approx(achieved, abs=1e-4)
        assert details["unspent_bits"] == pytest.approx(target - achieved, abs=2e-4)
    assert achieved == 8.0
