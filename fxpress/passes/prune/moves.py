"""Moves: what the greedy scheduler takes in one go, priced by the joint loss of a family's weakest units.

Scoring units one at a time misses how they add up: masking any one head of an attention costs little,
masking all but one wrecks it. So the units of a family are put in order of their own score per saved
cost, and the family is scored jointly at a few depths (the weakest 1, 2, 4, ... units masked
together). The lower convex hull of those (saved cost, joint score) points cuts the family into moves
of rising marginal price; a move is only taken after the one before it. Blocks are moves of their own.
Without a joint scorer (magnitude, random) a family's score is the sum of its units' scores.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from fxpress.passes.prune.candidates import Candidate

JointScore = Callable[[list[Candidate]], float]


@dataclass(frozen=True)
class Move:
    """Candidates removed together, their marginal score, and their place in their family's sequence."""

    candidates: tuple[Candidate, ...]
    score: float
    family: str | None = None
    order: int = 0


def _depths(count: int) -> list[int]:
    """Return the prefix lengths scored jointly: 1, 2, 4, ... and `count` itself."""
    depths, k = [], 1
    while k < count:
        depths.append(k)
        k *= 2
    return depths + [count]


def _hull(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Return the lower convex hull of (cost, score, depth) points sorted by cost, from (0, 0, 0)."""
    hull: list[tuple[float, float, int]] = [(0.0, 0.0, 0)]
    for point in points:
        while len(hull) >= 2:
            (c0, s0, _), (c1, s1, _) = hull[-2], hull[-1]
            if (s1 - s0) * (point[0] - c0) >= (point[1] - s0) * (c1 - c0):
                hull.pop()  # the middle point lies on or above the line: it is not a cheaper stop
            else:
                break
        hull.append(point)
    return hull


def removable_prefix(family_cands: list[Candidate]) -> list[Candidate]:
    """Return the longest prefix of one family's candidates that leaves at least one unit of the family."""
    if not family_cands:
        return []
    family = family_cands[0].family
    assert family is not None
    left, out = len(family.units), []
    for cand in family_cands:
        if left - len(cand.units) < 1:
            break
        left -= len(cand.units)
        out.append(cand)
    return out


def plan_moves(candidates: list[Candidate], scores: dict[str, float], rank: dict[str, float],
               joint: JointScore | None = None, order_only: bool = False) -> list[Move]:
    """Return the moves for `candidates` (`scores` each alone, `rank` the cost each saves).

    With `joint`, each family is scored jointly at a few depths and split along its convex hull;
    `order_only` says the family members' scores only put them in order (local errors, not KD losses),
    so the first depth is scored by `joint` too.
    """
    moves: list[Move] = []
    families: dict[str, list[Candidate]] = {}
    for cand in candidates:
        if rank[cand.name] <= 0:
            continue
        if cand.family is None:
            moves.append(Move((cand,), scores[cand.name]))
        else:
            families.setdefault(cand.family.name, []).append(cand)
    for name, members in families.items():
        members = removable_prefix(sorted(members, key=lambda c: (max(scores[c.name], 0.0) / rank[c.name], c.name)))
        if not members:
            continue
        if joint is None:
            moves += [Move((c,), scores[c.name], name, i) for i, c in enumerate(members)]
            continue
        points, cost = [], 0.0
        running = [0.0]
        for c in members:
            cost += rank[c.name]
            running.append(cost)
        for depth in _depths(len(members)):
            score = scores[members[0].name] if depth == 1 and not order_only else joint(members[:depth])
            points.append((running[depth], score, depth))
        hull = _hull(points)
        for order, ((_, s0, d0), (_, s1, d1)) in enumerate(zip(hull, hull[1:])):
            moves.append(Move(tuple(members[d0:d1]), s1 - s0, name, order))
    return moves


def joint_calls(candidates: list[Candidate], scores: dict[str, float], rank: dict[str, float],
                order_only: bool = False) -> int:
    """Return how many times `plan_moves` will call its joint scorer on these candidates."""
    calls = [0]

    def count(_: list[Candidate]) -> float:
        calls[0] += 1
        return 0.0

    plan_moves(candidates, scores, rank, count, order_only)
    return calls[0]


class _Plan:
    """Moves taken so far: the candidates, how much they save, their score, each family's progress."""

    def __init__(self, costs: dict[str, float], target: float):
        self.costs, self.target = costs, target
        self.taken: list[Candidate] = []
        self.done: dict[str, int] = {}  # family -> moves taken
        self.used: set[int] = set()  # positions in the ordered moves taken or set aside
        self.saved = self.score = 0.0

    def copy(self) -> _Plan:
        other = _Plan(self.costs, self.target)
        other.taken, other.done, other.used = list(self.taken), dict(self.done), set(self.used)
        other.saved, other.score = self.saved, self.score
        return other

    @property
    def met(self) -> bool:
        return self.saved >= self.target

    def allowed(self, move: Move) -> bool:
        if move.family is not None and self.done.get(move.family, 0) != move.order:
            return False  # the family's cheaper moves come first
        first = move.candidates[0]
        if any(_inside(first, t.block) for t in self.taken if t.level == "block"):
            return False  # its block is already gone
        return not (first.level == "block" and any(_inside(t, first.block) for t in self.taken))

    def overshoots(self, move: Move) -> bool:
        return move.family is None and self.saved + self.costs[move.candidates[0].name] > 1.1 * self.target

    def take(self, move: Move) -> None:
        """Take `move`; a family move stops at the target (scored for the share of it taken)."""
        total = sum(self.costs[c.name] for c in move.candidates)
        for cand in move.candidates:
            if self.met:
                break
            self.taken.append(cand)
            self.saved += self.costs[cand.name]
            self.score += max(move.score, 0.0) * self.costs[cand.name] / max(total, 1e-30)
        if move.family is not None:
            self.done[move.family] = self.done.get(move.family, 0) + 1

    def fill(self, ordered: list[Move], *, blocks_may_overshoot: bool) -> None:
        """Take moves in order until the target is met; sweep again while taking one unlocks another.

        A block that would overshoot the target by more than 10% is taken only if filling the gap with
        everything else would score worse (or could not fill it).
        """
        progress = True
        while progress and not self.met:
            progress = False
            for i, move in enumerate(ordered):
                if self.met:
                    break
                if i in self.used or not self.allowed(move):
                    continue
                if self.overshoots(move):
                    if not blocks_may_overshoot:
                        continue
                    rest = self.copy()
                    rest.used.add(i)
                    rest.fill(ordered, blocks_may_overshoot=False)
                    if rest.met and rest.score - self.score < max(move.score, 0.0):
                        continue  # the smaller moves fill the gap for less
                self.used.add(i)
                self.take(move)
                progress = True


def choose_moves(moves: list[Move], costs: dict[str, float], target: float,
                 rank: dict[str, float] | None = None) -> list[Candidate]:
    """Take moves by increasing score per saved `rank` cost (default `costs`) until `target` of `costs`
    is saved, keeping the model whole; return the candidates taken.

    A family move is cut short once the target is met; a block that would overshoot the target is
    taken only when the smaller moves that could fill the gap instead would score more.
    """
    rank = costs if rank is None else rank

    def price(move: Move) -> float:
        return max(move.score, 0.0) / max(sum(rank[c.name] for c in move.candidates), 1e-30)

    ordered = sorted(moves, key=lambda m: (price(m), m.family or "", m.order, m.candidates[0].name))
    plan = _Plan(costs, target)
    plan.fill(ordered, blocks_may_overshoot=True)
    return plan.taken


def candidate_plans(moves: list[Move], costs: dict[str, float], target: float,
                    rank: dict[str, float] | None = None) -> list[list[Candidate]]:
    """Return the greedy plan over every level first, then each different plan drawn from some of the
    levels (blocks only, heads and channels, ...) that meets `target`."""
    everything = choose_moves(moves, costs, target, rank)
    if not everything:
        return []
    levels = sorted({m.candidates[0].level for m in moves})
    plans = [everything]
    for size in range(1, len(levels)):
        for subset in itertools.combinations(levels, size):
            plan = choose_moves([m for m in moves if m.candidates[0].level in subset], costs, target, rank)
            if plan and sum(costs[c.name] for c in plan) >= target and plan not in plans:
                plans.append(plan)
    return plans


def best_plan(moves: list[Move], costs: dict[str, float], target: float, rank: dict[str, float] | None = None,
              joint: JointScore | None = None) -> list[Candidate]:
    """Return the candidates to remove this round: the greedy plan over every level, or, with `joint`,
    whichever of `candidate_plans` has the least joint score, all its candidates masked together.

    The greedy adds up scores measured one family at a time; checking whole plans catches what it
    cannot see (narrowing every layer a little can hurt more than losing one block).
    """
    if joint is None:
        return choose_moves(moves, costs, target, rank)
    plans = candidate_plans(moves, costs, target, rank)
    if len(plans) <= 1:
        return plans[0] if plans else []
    return min(plans, key=lambda plan: joint(plan))


def _inside(cand: Candidate, block: str) -> bool:
    return any(name.startswith(block + ".") for unit in cand.units for name, _ in unit.slices)
