"""Moves: a family's units priced by their joint score, taken in order, cut short at the target."""

from __future__ import annotations

from fxpress.ir.dependency import Family, Unit
from fxpress.passes.prune.candidates import Candidate
from fxpress.passes.prune.moves import best_plan, choose_moves, plan_moves


def _family(name: str, count: int, block: str = "blocks.0") -> list[Candidate]:
    units = [Unit({(f"{block}.{name}.weight", 0): (i,)}, "head") for i in range(count)]
    family = Family(f"{block}.{name}", "head", units)
    return [Candidate(f"{family.name} #{i}", "head", family, (u,)) for i, u in enumerate(units)]


def test_joint_scores_stop_a_family_being_stripped_when_a_block_is_cheaper():
    heads = _family("attn", 4, "blocks.0")
    block = Candidate("block blocks.1", "block", block="blocks.1")
    cands = heads + [block]
    scores = {c.name: 0.1 for c in heads} | {block.name: 1.0}
    costs = {c.name: 1.0 for c in heads} | {block.name: 3.0}

    def joint(taken: list[Candidate]) -> float:  # heads matter little alone, a lot together
        return 0.1 * len(taken) ** 4

    alone = choose_moves(plan_moves(cands, scores, costs), costs, 3.0)
    together = choose_moves(plan_moves(cands, scores, costs, joint), costs, 3.0)
    assert [c.level for c in alone] == ["head"] * 3  # 8.1 of joint loss, priced as 0.3
    assert block.name in [c.name for c in together] and len(together) <= 2  # 1.0 (+ 0.1 for the first head)


def test_a_family_is_cut_along_its_convex_hull_and_taken_in_order():
    heads = _family("attn", 8)
    scores = {c.name: 0.0 for c in heads}
    costs = {c.name: 1.0 for c in heads}
    depths = {2: 0.1, 4: 5.0, 7: 6.0}  # removing 4 is no cheaper per unit than going to 7
    moves = plan_moves(heads, scores, costs, lambda taken: depths[len(taken)])
    assert [len(m.candidates) for m in moves] == [1, 1, 5]
    assert [m.order for m in moves] == [0, 1, 2]
    assert sum(len(m.candidates) for m in moves) == 7  # one unit of the family always stays


def test_a_family_move_is_cut_short_at_the_target():
    heads = _family("attn", 8)
    scores = {c.name: 0.0 for c in heads}
    costs = {c.name: 1.0 for c in heads}
    taken = choose_moves(plan_moves(heads, scores, costs, lambda taken: 0.0), costs, 2.5)
    assert len(taken) == 3


def test_a_block_that_overshoots_is_taken_only_when_filling_the_gap_costs_more():
    heads = _family("attn", 4, "blocks.0")
    block = Candidate("block blocks.1", "block", block="blocks.1")
    costs = {c.name: 1.0 for c in heads} | {block.name: 10.0}
    for block_score, expected in ((5.0, ["head", "head"]), (1.5, ["block"])):  # two heads score 2.0
        scores = {c.name: 1.0 for c in heads} | {block.name: block_score}
        taken = choose_moves(plan_moves(heads + [block], scores, costs), costs, 2.0)
        assert [c.level for c in taken] == expected
    scores = {c.name: 1.0 for c in heads} | {block.name: 50.0}
    taken = choose_moves(plan_moves(heads + [block], scores, costs), costs, 5.0)  # heads alone fall short
    assert block.name in [c.name for c in taken]


def test_nothing_inside_a_removed_block_is_taken():
    heads = _family("attn", 4, "blocks.0")
    block = Candidate("block blocks.0", "block", block="blocks.0")
    scores = {c.name: 1.0 for c in heads} | {block.name: 0.0}
    costs = {c.name: 1.0 for c in heads} | {block.name: 4.0}
    taken = choose_moves(plan_moves(heads + [block], scores, costs), costs, 5.0)
    assert [c.name for c in taken] == [block.name]


def test_a_round_takes_the_plan_whose_joint_score_is_least():
    """Heads of two attentions each look cheap alone; together they cost more than one block."""
    heads = _family("attn1", 4, "blocks.0") + _family("attn2", 4, "blocks.0")
    block = Candidate("block blocks.1", "block", block="blocks.1")
    cands = heads + [block]
    scores = {c.name: 0.1 for c in heads} | {block.name: 1.0}
    costs = {c.name: 1.0 for c in heads} | {block.name: 4.0}

    def joint(taken: list[Candidate]) -> float:
        if any(c.level == "block" for c in taken):
            return 1.0 + 0.1 * (len(taken) - 1)
        families = {c.family.name for c in taken}
        return 0.1 * len(taken) * (10.0 if len(families) > 1 else 1.0)  # two narrowed attentions compound

    moves = plan_moves(cands, scores, costs, joint)
    greedy = choose_moves(moves, costs, 4.0)
    assert {c.level for c in greedy} == {"head"} and joint(greedy) > 1.0
    assert [c.name for c in best_plan(moves, costs, 4.0, joint=joint)] == [block.name]
    assert best_plan(moves, costs, 4.0) == greedy  # no joint scorer (magnitude, random): the greedy plan
