"""Validate dependency groups by execution: remove a unit, run the model's own forward, compare.

The graph says which slices belong together, but a model's Python code can also tie sizes together
in ways a static graph hides (PixArt reshapes the caption projection to the width of the image
tokens). Each family is tried by removing one of its units from a copy of the model and comparing
the model's own forward with the masked original; families are tried all at once and split in
halves only when something fails, so a clean model costs one trial.
"""

from __future__ import annotations

import copy

from torch import nn

from fxpress.errors import PassError
from fxpress.ir.dependency import DependencyGroups, Family
from fxpress.passes.prune.remove import check_removal, mask_units, remove_units


def _trial(model: nn.Module, families: list[Family], inputs: list[dict]) -> str | None:
    """Return None when removing the first unit of every family matches masking it, else the reason."""
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    removals = [(f, f.units[:1]) for f in families]
    try:
        remove_units(pruned, removals)
        mask_units(masked, [u for _, units in removals for u in units])
        check_removal(pruned, masked, inputs)
    except PassError as exc:
        return str(exc)
    return None


def validate_groups(model: nn.Module, groups: DependencyGroups, inputs: list[dict]) -> DependencyGroups:
    """Return `groups` without the families whose removal changes the model, which move to `refused`."""
    model = model.eval()
    bad: dict[str, str] = {}

    def search(candidates: list[Family]) -> None:
        if not candidates:
            return
        reason = _trial(model, candidates, inputs)
        if reason is None:
            return
        if len(candidates) == 1:
            bad[candidates[0].name] = reason
            return
        half = len(candidates) // 2
        search(candidates[:half])
        search(candidates[half:])

    search(groups.families)
    kept = [f for f in groups.families if f.name not in bad]
    refused = dict(groups.refused)
    for name, reason in bad.items():
        refused[name] = f"removing one unit breaks the model: {reason}"
    return DependencyGroups(kept, refused)
