"""Greedy latency-aware pruning: remove what matters least per unit of cost saved, round by round.

Each round re-captures the (already pruned) model, rebuilds its dependency groups, blocks and cost
model, scores every candidate, and removes the cheapest-to-lose candidates (lowest score per saved
cost) until that round's share of the budget is met; an optional short recovery runs in between.
What earlier rounds found cannot be removed is not tried again. Each phase of a round shows a
progress bar, and each round starts with a line estimating the time left from the rounds so far.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fxpress.errors import PassError, RecipeError
from fxpress.ir.blocks import block_units
from fxpress.ir.dependency import dependency_groups
from fxpress.ir.graph import Graph, Inputs
from fxpress.output import stderr_console
from fxpress.passes.progress import progress_bar
from fxpress.passes.prune.bypass import StreamArg, bypass_blocks, find_stream_args, validate_bypass
from fxpress.passes.prune.calibrate import latency_factors
from fxpress.passes.prune.candidates import LEVELS, Candidate, build_candidates
from fxpress.passes.prune.choose import choose_round
from fxpress.passes.prune.costs import COST_KINDS, build_cost_model, candidate_cost, latencies_in_turns
from fxpress.passes.prune.remove import remove_units
from fxpress.passes.prune.scores import DistillTarget
from fxpress.passes.prune.validate import validate_groups
from fxpress.passes.quant.select_layers import resolve_keep

SCORERS = ("kd", "magnitude", "random")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune to: keep `budget` of the `cost` ('latency', 'flops', 'params'), scored by `scorer`.

    Candidates are ranked by score per unit of `rank_by` saved ('' means the budget's own cost): a
    FLOPs budget ranked by measured latency removes what is slow for its FLOPs first. Latency is
    timed at the example inputs' batch, or tiled to `latency_batch` rows when that is set (the batch
    the model will serve at: a small model at batch 1-2 is bound by per-op overhead, not compute).
    A round with more than `kd_each_limit` head and channel candidates orders each family's units by
    their local error rather than a KD loss each (see `choose`); raising it trades time for that order.
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
    latency_batch: int = 0  # 0: the example inputs' own batch
    keep: tuple[str, ...] = ()  # module-path globs (or 'first', 'last', 'time_embedding') never pruned
    kd_each_limit: int = 512  # every testbed model has fewer; DiT-S about 1,500

    def timing_inputs(self, example: Inputs) -> Inputs:
        """Return the inputs latency is timed on: `example`, tiled to `latency_batch` rows when that is set."""
        return example.with_batch(self.latency_batch) if self.latency_batch else example

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
        if self.latency_batch < 0:
            raise RecipeError(f"latency_batch must be a batch size (0: the example's own), got {self.latency_batch}")
        if self.kd_each_limit < 0:
            raise RecipeError(f"kd_each_limit must be a count of candidates (>= 0), got {self.kd_each_limit}")
        if self.rounds < 1 or self.channel_group < 1:
            raise RecipeError("pruning needs at least one round and channel groups of at least one channel")


@dataclass
class PruneRound:
    """What one round removed, and the model's cost before and after (as the cost model counts it)."""

    removed: dict[str, list[str]] = field(default_factory=dict)  # level -> candidate names
    cost_before: float = 0.0
    cost_after: float = 0.0
    refused_blocks: dict[str, str] = field(default_factory=dict)
    latency_factors: dict[str, float] = field(default_factory=dict)  # measured / modelled saving, per level
    candidates: int = 0
    scoring: str = ""  # "kd" (each candidate alone), "kd+local" (families in local order), "magnitude", "random"
    kd_losses: int = 0  # KD losses measured (one forward per calibration input each)
    seconds: float = 0.0


@dataclass
class Pruned:
    """A pruned copy of a model, what each round removed, and the structure edits an artifact must replay."""

    model: nn.Module
    rounds: list[PruneRound]
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)  # module path -> attributes set
    bypassed: dict[str, StreamArg] = field(default_factory=dict)  # removed block -> where its stream is
    goal: float = 0.0  # the budget in the cost's unit (latency: a fraction of the unpruned model's)
    final_cost: float = 0.0  # the pruned model's cost, as measured (latency) or counted at the last round

    @property
    def met(self) -> bool:
        """Whether the pruned model is within its budget (it may not be when nothing more could go)."""
        return self.final_cost <= self.goal
    def structure(self) -> dict[str, Any]:
        """Return the JSON-ready edits that turn the unpruned architecture into this one."""
        inside = tuple(p + "." for p in self.bypassed)
        return {"bypass": {p: s.to_json() for p, s in self.bypassed.items()},
                "attributes": {p: a for p, a in self.attributes.items() if not p.startswith(inside)}}


def _key(plan: list[Candidate]) -> tuple[str, ...]:
    return tuple(sorted(c.name for c in plan))


def _remove(model: nn.Module, chosen: list[Candidate],
            streams: dict[str, StreamArg]) -> tuple[dict[str, dict[str, Any]], dict[str, StreamArg]]:
    """Remove `chosen` from `model` in place; return the attributes set (by module) and the blocks bypassed."""
    by_family: dict[str, tuple] = {}
    for cand in chosen:
        if cand.family is not None:
            by_family.setdefault(cand.family.name, (cand.family, []))[1].extend(cand.units)
    attributes = remove_units(model, list(by_family.values()))
    gone = {c.block: streams[c.block] for c in chosen if c.level == "block"}
    bypass_blocks(model, gone)
    return attributes, gone


class _Trials:
    """Judges a round's plans by the KD loss of a copy with the plan removed and briefly fine-tuned
    (`trial`), keeping each trained copy so that the winner need not be trained again."""

    def __init__(self, model: nn.Module, streams: dict[str, StreamArg], target: DistillTarget,
                 trial: Callable[[nn.Module], None]):
        self.model, self.streams, self.target, self.trial = model, streams, target, trial
        self.kept: dict[tuple[str, ...], tuple[nn.Module, tuple]] = {}

    def __call__(self, plan: list[Candidate]) -> float:
        trained = copy.deepcopy(self.model)
        edits = _remove(trained, plan, self.streams)
        self.trial(trained)
        self.kept[_key(plan)] = (trained, edits)
        return self.target.loss(trained)


def _announce(index: int, rounds: int, spent: list[float], total: float, goal: float) -> None:
    """Log the round about to run, and an estimate of what is left from the rounds so far."""
    line = f"TriLevelPrune round {index + 1} (of {rounds} planned): cost {total:.4g}, goal {goal:.4g}"
    if spent:
        left = max(rounds - index, 1) * sum(spent) / len(spent)
        line += f"; {len(spent)} round(s) took {sum(spent):.0f} s, about {left / 60:.1f} min left at that pace"
    stderr_console().print(line)


class _Refused:
    """What earlier rounds found cannot go (families, blocks, with why): refused again without a trial."""

    def __init__(self) -> None:
        self.families: dict[str, str] = {}
        self.blocks: dict[str, str] = {}


def _analyse(label: str, student: nn.Module, current: Graph, config: PruneConfig, rank_by: str,
             inputs: list[dict], known: _Refused) -> tuple[Any, dict[str, StreamArg], dict[str, str]]:
    """Return the round's checked dependency groups, the blocks that can go, and those that cannot (why).

    What an earlier round found broken (the model's own code reaches into it) stays refused without
    another trial; everything else is tried again, all at once.
    """
    with progress_bar(f"{label}: dependency groups", 4) as advance:
        groups = dependency_groups(current, footprints="latency" in (config.cost, rank_by))
        advance(description=f"{label}: removing one unit of each of {len(groups.families)} families for real")
        groups = validate_groups(student, groups, inputs[:1], known.families)
        advance(description=f"{label}: finding each block's stream")
        paths = [b.path for b in block_units(current).blocks] if "block" in config.levels else []
        streams, refused = find_stream_args(student, paths, inputs[0])
        refused.update({p: r for p, r in known.blocks.items() if p in streams})
        streams = {p: s for p, s in streams.items() if p not in known.blocks}
        advance(description=f"{label}: removing {len(streams)} blocks for real")
        streams, broken = validate_bypass(student, streams, inputs[:1])
        advance()
    known.blocks.update(broken)
    return groups, streams, {**refused, **broken}


def greedy_prune(graph: Graph, config: PruneConfig, recover: Callable[[nn.Module, int], None] | None = None,
                 trial: Callable[[nn.Module], None] | None = None) -> Pruned:
    """Return a pruned copy of `graph.module` (the original is untouched) with what each round removed.

    The graph's calibration inputs (keyword arguments, several timesteps) drive scoring and checks;
    `recover(model, round)` may fine-tune between rounds; with KD scoring, `trial(model)` briefly
    fine-tunes each of a round's plans before they are compared (the winner is kept as it is trained).
    Every phase that takes more than a moment shows a progress bar (silent under FXPRESS_QUIET).
    Raises PassError when nothing more can go.
    """
    inputs = [c.kwargs for c in graph.calibration]
    protected = tuple(resolve_keep(graph, list(config.keep)))  # layers `keep` names are never removed or narrowed
    if config.latency_batch and "latency" in (config.cost, config.rank_by):
        graph = graph.recapture(graph.module, config.timing_inputs(graph.example))
    teacher = copy.deepcopy(graph.module).eval().requires_grad_(False)
    student = copy.deepcopy(graph.module).eval().requires_grad_(False)
    target = DistillTarget(teacher, inputs, config.feature_weight) if config.scorer == "kd" else None
    result = Pruned(student, [])
    rank_by = config.rank_by or config.cost
    timed = config.cost == "latency" and not graph.example.args
    if timed:  # latency is counted as a fraction of the unpruned model's, the two timed in turns
        result.goal = config.budget
    known = _Refused()
    spent: list[float] = []
    for index in range(config.rounds * 3 + 1):  # a round may fall short; give it a few more tries
        started = time.perf_counter()
        label = f"round {index + 1}"
        with progress_bar(f"{label}: capturing the model", 1) as advance:
            current = graph.recapture(student)
            advance()
        costs = build_cost_model(current, config.cost, config.latency_repeats)
        if timed:  # nothing removed yet is the whole latency by definition; after that, time the two in turns
            now, before = latencies_in_turns([student, teacher], graph.example, config.latency_repeats) \
                if result.rounds else (1.0, 1.0)
            total, scale = now / before, now / before / costs.total
        else:
            total, scale = costs.total, 1.0
            if index == 0:
                result.goal = config.budget * costs.total
        initial = 1.0 if timed else result.goal / config.budget
        goal = result.goal
        result.final_cost = total
        if total <= goal or index == config.rounds * 3:
            break
        _announce(index, config.rounds, spent, total, goal)
        record = PruneRound(cost_before=total)
        ranking = costs if rank_by == config.cost else build_cost_model(current, rank_by, config.latency_repeats)
        groups, streams, refused = _analyse(label, student, current, config, rank_by, inputs, known)
        record.refused_blocks.update(refused)
        cands = build_candidates(student, groups, list(streams), levels=config.levels,
                                 channel_group=config.channel_group, protected=protected)
        saved = {c.name: scale * candidate_cost(costs, c) for c in cands}
        cands = [c for c in cands if saved[c.name] > 0]  # what saves nothing of the budget is not worth losing
        rank = saved if ranking is costs else {c.name: candidate_cost(ranking, c) for c in cands}
        if "latency" in (config.cost, rank_by) and not graph.example.args:
            timing = costs if config.cost == "latency" else ranking
            seconds = {c.name: candidate_cost(timing, c) for c in cands}
            record.latency_factors = latency_factors(student, cands, seconds, timing.total, streams,
                                                     graph.example, config.latency_repeats)
            same, factors = rank is saved, record.latency_factors
            if config.cost == "latency":
                saved = {c.name: saved[c.name] * factors[c.level] for c in cands}
            if rank_by == "latency":
                rank = saved if same else {c.name: rank[c.name] * factors[c.level] for c in cands}
        step = min(total - goal, (initial - goal) / config.rounds)
        trials = _Trials(student, streams, target, trial) if trial is not None and target is not None else None
        choice = choose_round(label, student, cands, config.scorer, target=target, streams=streams, saved=saved,
                              rank=rank, step=step, seed=config.seed + index, kd_each_limit=config.kd_each_limit,
                              judge=trials)
        chosen = choice.chosen
        record.candidates, record.scoring, record.kd_losses = len(cands), choice.scoring, choice.kd_losses
        if not chosen:
            raise PassError(f"nothing left to prune: cost {total:.4g} is still above the goal {goal:.4g}",
                            "TriLevelPrune")
        for cand in chosen:
            record.removed.setdefault(cand.level, []).append(cand.name)
        if trials is not None and trials.kept.get(_key(chosen)) is not None:
            student, (attributes, gone) = trials.kept[_key(chosen)]  # the winner, already fine-tuned
            result.model = student
        else:
            attributes, gone = _remove(student, chosen, streams)
        for path, attrs in attributes.items():
            result.attributes.setdefault(path, {}).update(attrs)
        result.bypassed.update(gone)
        if recover is not None:
            recover(student, index)
        record.cost_after = total - sum(saved[c.name] for c in chosen)
        record.seconds = time.perf_counter() - started
        spent.append(record.seconds)
        result.rounds.append(record)
    return result
