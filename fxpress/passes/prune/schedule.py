"""Greedy latency-aware pruning: remove what matters least per unit of cost saved, round by round.

Each round re-captures the (already pruned) model, rebuilds its dependency groups, blocks and cost
model, scores every candidate, and removes the cheapest-to-lose candidates (lowest score per saved
cost) until that round's share of the budget is met; an optional short recovery runs in between.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fxpress.errors import PassError, RecipeError
from fxpress.ir.blocks import block_units
from fxpress.ir.dependency import dependency_groups
from fxpress.ir.graph import Graph
from fxpress.passes.prune.bypass import StreamArg, bypass_blocks, find_stream_args, validate_bypass
from fxpress.passes.prune.candidates import LEVELS, Candidate, build_candidates
from fxpress.passes.prune.costs import COST_KINDS, build_cost_model, candidate_cost
from fxpress.passes.prune.remove import remove_units
from fxpress.passes.prune.scores import DistillTarget, kd_scores, magnitude_scores, random_scores
from fxpress.passes.prune.validate import validate_groups

SCORERS = ("kd", "magnitude", "random")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune to: keep `budget` of the `cost` ('latency', 'flops', 'params'), scored by `scorer`.

    Candidates are ranked by score per unit of `rank_by` saved ('' means the budget's own cost): a
    FLOPs budget ranked by measured latency removes what is slow for its FLOPs first.
    """

    cost: str = "latency"
    budget: float = 0.5
    scorer: str = "kd"
    levels: tuple[str, ...] = LEVELS
    channel_group: int = 16
    rounds: int = 4
    feature_weight: float = 1.0
    seed: int = 0
    latency_repeats: int = 10
    rank_by: str = ""

    def __post_init__(self) -> None:
        if self.cost not in COST_KINDS or self.rank_by not in ("", *COST_KINDS):
            bad = self.cost if self.cost not in COST_KINDS else self.rank_by
            raise RecipeError(f"unknown pruning cost {bad!r}; use one of {', '.join(COST_KINDS)}")
        if not 0.0 < self.budget < 1.0:
            raise RecipeError(f"pruning budget must be a fraction in (0, 1) of the {self.cost}, got {self.budget}")
        if self.scorer not in SCORERS:
            raise RecipeError(f"unknown pruning scorer {self.scorer!r}; use one of {', '.join(SCORERS)}")
        if not self.levels or any(level not in LEVELS for level in self.levels):
            raise RecipeError(f"pruning levels must be among {LEVELS}, got {self.levels}")
        if self.rounds < 1 or self.channel_group < 1:
            raise RecipeError("pruning needs at least one round and channel groups of at least one channel")


@dataclass
class PruneRound:
    """What one round removed, and the model's cost before and after (as the cost model counts it)."""

    removed: dict[str, list[str]] = field(default_factory=dict)  # level -> candidate names
    cost_before: float = 0.0
    cost_after: float = 0.0
    refused_blocks: dict[str, str] = field(default_factory=dict)


def _inside(cand: Candidate, block: str) -> bool:
    return any(name.startswith(block + ".") for unit in cand.units for name, _ in unit.slices)


def _choose(cands: list[Candidate], scores: dict[str, float], costs: dict[str, float],
            target: float, rank: dict[str, float] | None = None) -> list[Candidate]:
    """Pick candidates by increasing score per saved `rank` cost (default: `costs`) until `target` of
    `costs` is saved, keeping models whole.

    A candidate that would overshoot the target by more than 10% waits until smaller ones are tried.
    """
    rank = costs if rank is None else rank
    ordered = sorted((c for c in cands if costs[c.name] > 0 and rank[c.name] > 0),
                     key=lambda c: (max(scores[c.name], 0.0) / rank[c.name], c.name))
    taken: list[Candidate] = []
    left: dict[str, int] = {}
    saved = 0.0

    def allowed(cand: Candidate) -> bool:
        if cand.family is not None and left.get(cand.family.name, len(cand.family.units)) - len(cand.units) < 1:
            return False  # keep at least one unit of every family
        if any(_inside(cand, t.block) for t in taken if t.level == "block"):
            return False  # its block is already gone
        return not (cand.level == "block" and any(_inside(t, cand.block) for t in taken))

    def take(cand: Candidate) -> None:
        nonlocal saved
        taken.append(cand)
        saved += costs[cand.name]
        if cand.family is not None:
            left[cand.family.name] = left.get(cand.family.name, len(cand.family.units)) - len(cand.units)

    deferred = []
    for cand in ordered:
        if saved >= target:
            break
        if not allowed(cand):
            continue
        if saved + costs[cand.name] > 1.1 * target:
            deferred.append(cand)
            continue
        take(cand)
    for cand in deferred:  # the target is still not met: accept overshooting candidates, best first
        if saved >= target:
            break
        if allowed(cand):
            take(cand)
    return taken


@dataclass
class Pruned:
    """A pruned copy of a model, what each round removed, and the structure edits an artifact must replay."""

    model: nn.Module
    rounds: list[PruneRound]
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)  # module path -> attributes set
    bypassed: dict[str, StreamArg] = field(default_factory=dict)  # removed block -> where its stream is
    goal: float = 0.0  # the budget in the cost's unit
    final_cost: float = 0.0  # the pruned model's cost, as the cost model counts it

    @property
    def met(self) -> bool:
        """Whether the pruned model is within its budget (it may not be when nothing more could go)."""
        return self.final_cost <= self.goal
    def structure(self) -> dict[str, Any]:
        """Return the JSON-ready edits that turn the unpruned architecture into this one."""
        inside = tuple(p + "." for p in self.bypassed)
        return {"bypass": {p: s.to_json() for p, s in self.bypassed.items()},
                "attributes": {p: a for p, a in self.attributes.items() if not p.startswith(inside)}}


def greedy_prune(graph: Graph, config: PruneConfig,
                 recover: Callable[[nn.Module, int], None] | None = None) -> Pruned:
    """Return a pruned copy of `graph.module` (the original is untouched) with what each round removed.

    The graph's calibration inputs (keyword arguments, several timesteps) drive scoring and checks;
    `recover(model, round)` may fine-tune between rounds. Raises PassError when nothing more can go.
    """
    inputs = [c.kwargs for c in graph.calibration]
    teacher = copy.deepcopy(graph.module).eval().requires_grad_(False)
    student = copy.deepcopy(graph.module).eval().requires_grad_(False)
    target = DistillTarget(teacher, inputs, config.feature_weight) if config.scorer == "kd" else None
    result = Pruned(student, [])
    initial = goal = None
    rank_by = config.rank_by or config.cost
    for index in range(config.rounds * 3 + 1):  # a round may fall short; give it a few more tries
        current = graph.recapture(student)
        costs = build_cost_model(current, config.cost, config.latency_repeats)
        if initial is None:
            initial = costs.total
            goal = result.goal = config.budget * initial
        result.final_cost = costs.total
        if costs.total <= goal or index == config.rounds * 3:
            break
        record = PruneRound(cost_before=costs.total)
        ranking = costs if rank_by == config.cost else build_cost_model(current, rank_by, config.latency_repeats)
        groups = dependency_groups(current, footprints="latency" in (config.cost, rank_by))
        groups = validate_groups(student, groups, inputs[:1])
        paths = [b.path for b in block_units(current).blocks] if "block" in config.levels else []
        streams, refused_blocks = find_stream_args(student, paths, inputs[0])
        streams, broken = validate_bypass(student, streams, inputs[:1])
        record.refused_blocks.update({**refused_blocks, **broken})
        cands = build_candidates(student, groups, list(streams), levels=config.levels,
                                 channel_group=config.channel_group)
        saved = {c.name: candidate_cost(costs, c) for c in cands}
        rank = saved if ranking is costs else {c.name: candidate_cost(ranking, c) for c in cands}
        if config.scorer == "kd":
            scores = kd_scores(student, cands, target, streams)
        elif config.scorer == "magnitude":
            scores = magnitude_scores(student, cands)
        else:
            scores = random_scores(cands, config.seed + index)
        step = min(costs.total - goal, (initial - goal) / config.rounds)
        chosen = _choose(cands, scores, saved, step, rank)
        if not chosen:
            raise PassError(f"nothing left to prune: cost {costs.total:.4g} is still above the goal {goal:.4g}",
                            "TriLevelPrune")
        by_family: dict[str, tuple] = {}
        for cand in chosen:
            record.removed.setdefault(cand.level, []).append(cand.name)
            if cand.family is not None:
                by_family.setdefault(cand.family.name, (cand.family, []))[1].extend(cand.units)
        for path, attrs in remove_units(student, list(by_family.values())).items():
            result.attributes.setdefault(path, {}).update(attrs)
        gone = {c.block: streams[c.block] for c in chosen if c.level == "block"}
        bypass_blocks(student, gone)
        result.bypassed.update(gone)
        if recover is not None:
            recover(student, index)
        record.cost_after = costs.total - sum(saved[c.name] for c in chosen)
        result.rounds.append(record)
    return result
