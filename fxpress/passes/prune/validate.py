"""Validate dependency groups by execution: remove a unit, run the model's own forward, compare.

The graph says which slices belong together, but a model's Python code can also tie sizes together
in ways a static graph hides (PixArt reshapes the caption projection to the width of the image
tokens). Each family is tried by removing one of its units from a copy of the model and comparing
the model's own forward with the masked original; families are tried all at once and split in
halves only when something fails, so a clean model costs one trial.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from fxpress.errors import PassError
from fxpress.ir.dependency import DependencyGroups, Family
from fxpress.passes.prune.remove import check_removal, consumer_columns, remove_units

T = TypeVar("T")


def _trial(model: nn.Module, families: list[Family], inputs: list[dict]) -> str | None:
    """Return None when removing the first unit of every family matches masking it, else the reason.

    The removal is made on a copy; the masks are put on `model` itself and taken off again."""
    pruned = copy.deepcopy(model)
    removals = [(f, f.units[:1]) for f in families]
    saved = []
    try:
        remove_units(pruned, removals)
        with torch.no_grad():
            for weight, columns in consumer_columns(model, [u for _, units in removals for u in units]):
                saved.append((weight, columns, weight.index_select(1, columns).clone()))
                weight.index_fill_(1, columns, 0.0)
        check_removal(pruned, model, inputs)
    except PassError as exc:
        return str(exc)
    finally:
        with torch.no_grad():
            for weight, columns, values in reversed(saved):
                weight.index_copy_(1, columns, values)
    return None


def find_failures(items: list[T], trial: Callable[[list[T]], str | None]) -> dict[T, str]:
    """Return the items that fail `trial` alone, with its reason: all are tried at once, and a failing
    set is halved until single items remain (one trial when nothing fails)."""
    bad: dict[T, str] = {}

    def search(part: list[T]) -> None:
        if not part:
            return
        reason = trial(part)
        if reason is None:
            return
        if len(part) == 1:
            bad[part[0]] = reason
            return
        search(part[: len(part) // 2])
        search(part[len(part) // 2:])

    search(items)
    return bad


def validate_groups(model: nn.Module, groups: DependencyGroups, inputs: list[dict],
                    known_bad: dict[str, str] | None = None) -> DependencyGroups:
    """Return `groups` without the families whose removal changes the model, which move to `refused`.

    `known_bad` (family name -> reason; filled in with the new failures) holds families refused by an
    earlier call on the same model, pruned since: they are refused again without a trial, so that the
    others usually pass in one.
    """
    model = model.eval()
    known = known_bad if known_bad is not None else {}
    bad = {f.name: known[f.name] for f in groups.families if f.name in known}
    tried = [f.name for f in groups.families if f.name not in bad]
    failed = find_failures(tried, lambda names: _trial(model, [f for f in groups.families if f.name in names],
                                                       inputs))
    known.update(failed)
    bad.update(failed)
    kept = [f for f in groups.families if f.name not in bad]
    refused = dict(groups.refused)
    for name, reason in bad.items():
        refused[name] = f"removing one unit breaks the model: {reason}"
    return DependencyGroups(kept, refused)
