"""One round's choice: score the candidates, price the families, compare whole plans, each with progress.

KD scoring is what a round spends its time on: one forward per calibration input for every candidate,
every depth of every family and every whole plan. A round with few head and channel candidates (every
testbed model) scores each alone by KD. Past `kd_each_limit` of them (DiT-S has about 1,500) each family's
units are put in order by their local error instead (`local_scores`: one forward per input for all of
them) and only the family's joint KD at a few depths is measured: a few hundred KD losses instead of
thousands. Blocks are always scored alone by KD.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from fxpress.passes.progress import progress_bar
from fxpress.passes.prune.bypass import StreamArg
from fxpress.passes.prune.candidates import Candidate
from fxpress.passes.prune.local import local_scores
from fxpress.passes.prune.moves import JointScore, candidate_plans, choose_moves, joint_calls, plan_moves
from fxpress.passes.prune.scores import DistillTarget, kd_joint, magnitude_scores, random_scores


@dataclass
class Choice:
    """What a round chose, how its candidates were scored, and how many KD losses that took."""

    chosen: list[Candidate]
    scoring: str  # "kd", "kd+local", "magnitude" or "random"
    kd_losses: int = 0


def _counting(score: JointScore, advance: Callable[..., None]) -> JointScore:
    def counted(cands: list[Candidate]) -> float:
        value = score(cands)
        advance()
        return value
    return counted


def choose_round(label: str, model: nn.Module, cands: list[Candidate], scorer: str, *,
                 target: DistillTarget | None, streams: dict[str, StreamArg], saved: dict[str, float],
                 rank: dict[str, float], step: float, seed: int, kd_each_limit: int,
                 judge: JointScore | None = None) -> Choice:
    """Return the candidates to remove this round (saving `step` of `saved`), scored by `scorer`.

    `judge` (KD only) compares whole plans instead of their joint KD loss (a trial fine-tune of each).
    """
    if scorer != "kd" or target is None:
        scores = magnitude_scores(model, cands) if scorer == "magnitude" else random_scores(cands, seed)
        return Choice(choose_moves(plan_moves(cands, scores, rank), saved, step, rank), scorer)
    losses = target.losses
    joint = kd_joint(model, target, streams)
    width = [c for c in cands if c.level != "block"]
    local = local_scores(model, width, target.inputs) if len(width) > kd_each_limit else {}
    alone = [c for c in cands if c.name not in local]
    with progress_bar(f"{label}: KD score of each candidate", len(alone)) as advance:
        scores = {c.name: _counting(joint, advance)([c]) for c in alone}
    scores.update(local)
    order_only = bool(local)
    calls = joint_calls(cands, scores, rank, order_only)
    with progress_bar(f"{label}: joint KD of each family at a few depths", calls) as advance:
        moves = plan_moves(cands, scores, rank, _counting(joint, advance), order_only)
    plans = candidate_plans(moves, saved, step, rank)
    if len(plans) <= 1 or judge is not None:  # trial fine-tunes show their own progress
        chosen = plans[0] if len(plans) == 1 else min(plans, key=judge) if plans else []
    else:
        with progress_bar(f"{label}: joint KD of {len(plans)} whole plans", len(plans)) as advance:
            chosen = min(plans, key=_counting(joint, advance))
    return Choice(chosen, "kd+local" if local else "kd", target.losses - losses)
