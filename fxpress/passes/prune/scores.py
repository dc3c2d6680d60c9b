"""How much each pruning candidate matters: KD-guided (distillation loss rise when masked), magnitude, random.

KD-guided is the mobile-DiT paper's criterion: the student is the model with the candidate masked,
the teacher the unmasked model; the loss is the shared `kd_loss` (output MSE plus block-feature MSE, each
divided by the teacher's variance), averaged over calibration inputs at several timesteps.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import torch
from torch import nn

from fxpress.errors import PassError
from fxpress.ir.graph import output_tensors
from fxpress.passes.distill.features import FeatureTap, block_modules
from fxpress.passes.prune.batching import merge_inputs, split_rows
from fxpress.passes.prune.bypass import StreamArg
from fxpress.passes.prune.candidates import Candidate, masked, unit_magnitude
from fxpress.passes.prune.replay import Around, BlockReplay
from fxpress.training.objectives import kd_loss


class DistillTarget:
    """The teacher's outputs and block features on fixed inputs, and the KD loss of a student on them.

    The inputs run as one batch (`merge_inputs`) when the teacher gives the same outputs and features
    that way as one input at a time; the loss is the same mean over inputs either way.
    """

    def __init__(self, teacher: nn.Module, inputs: list[dict], feature_weight: float = 1.0):
        self.inputs, self.feature_weight = inputs, feature_weight
        self.merged: tuple[dict, list[int]] | None = None
        self.outputs, self.features = self._run(teacher)
        self.merged = merge_inputs(inputs)
        if self.merged is not None and not self._same(*self._run(teacher)):
            self.merged = None
        self.losses = 0  # KD losses computed by `loss`

    @property
    def runs(self) -> int:
        """Forwards of the model per KD loss (one per input, or one for them all)."""
        return 1 if self.merged is not None else len(self.inputs)

    def _same(self, outputs: list[torch.Tensor] | None, features: list[dict[str, torch.Tensor]] | None) -> bool:
        if outputs is None or features is None:
            return False
        pairs = [(a, b) for a, b in zip(outputs, self.outputs)]
        for got, ref in zip(features, self.features):
            if got.keys() != ref.keys():
                return False
            pairs += [(got[k], ref[k]) for k in ref]
        return all(a.shape == b.shape and float((a - b).abs().max()) <= 1e-4 * max(float(b.abs().max()), 1e-12)
                   for a, b in pairs)

    def _forward(self, model: nn.Module, kwargs: dict, index: int,
                 around: Around | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tap = FeatureTap(block_modules(model)) if self.feature_weight else None
        try:
            with around(index) if around is not None else contextlib.nullcontext():
                output = output_tensors(model(**kwargs))[0]
        finally:
            if tap is not None:
                tap.close()
        return output, dict(tap.values) if tap is not None else {}

    @torch.no_grad()
    def _run(self, model: nn.Module, around: Around | None = None) -> tuple[list, list]:
        """Return the model's output and block features per input (None, None when a batched run's
        output cannot be cut back into inputs)."""
        if self.merged is None:
            runs = [self._forward(model, kwargs, i, around) for i, kwargs in enumerate(self.inputs)]
            return [out for out, _ in runs], [feats for _, feats in runs]
        kwargs, sizes = self.merged
        output, feats = self._forward(model, kwargs, 0, around)
        outputs = split_rows(output, sizes)
        if outputs is None:
            return None, None
        features: list[dict[str, torch.Tensor]] = [{} for _ in sizes]
        for name, value in feats.items():
            pieces = split_rows(value, sizes)
            for per_input, piece in zip(features, pieces or []):
                per_input[name] = piece
        return outputs, features

    def loss(self, student: nn.Module, around: Around | None = None) -> float:
        """Return the mean KD loss of `student` (output plus weighted block features, variance-normalised);
        `around(i)`, when given, is the context the i-th forward runs in (recording, replaying)."""
        self.losses += 1
        outputs, features = self._run(student, around)
        if outputs is None:
            raise PassError("the student's batched output no longer splits into its inputs", "TriLevelPrune")
        total = sum(float(kd_loss(out, ref, feats, refs, feature_weight=self.feature_weight, normalize="all"))
                    for out, ref, feats, refs in zip(outputs, self.outputs, features, self.features))
        return total / len(self.inputs)


def kd_scores(model: nn.Module, candidates: list[Candidate], target: DistillTarget,
              streams: dict[str, StreamArg], progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Return, per candidate, the KD loss of `model` with that candidate masked (the rise over unmasked).

    The blocks that run before a candidate replay their unmasked outputs (`BlockReplay`): same scores,
    fewer block forwards. `progress(1)` is called after each candidate.
    """
    joint = kd_joint(model, target, streams)
    scores = {}
    for cand in candidates:
        scores[cand.name] = joint([cand])
        if progress is not None:
            progress(1)
    return scores


def kd_joint(model: nn.Module, target: DistillTarget,
             streams: dict[str, StreamArg]) -> Callable[[list[Candidate]], float]:
    """Return a function giving the KD loss rise of `model` with several candidates masked together
    (the blocks that run before all of them replay their unmasked outputs)."""
    replay = BlockReplay(model, block_modules(model))
    base = target.loss(model, replay.recording)

    def joint(candidates: list[Candidate]) -> float:
        around = replay.skipping(candidates)
        with masked(model, candidates, streams):
            return target.loss(model, around) - base

    return joint


def magnitude_scores(model: nn.Module, candidates: list[Candidate]) -> dict[str, float]:
    """Return, per candidate, the mean squared weight it removes relative to the tensors it comes from.

    Relative, because layers differ in scale (an embedding table drawn from N(0, 1) next to a linear at
    1/fan_in): a unit scores 1 when its slices are as large as their tensors on average, a whole block 1.
    """
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    scales: dict[str, float] = {}
    return {cand.name: 1.0 if cand.level == "block" else
            sum(unit_magnitude(tensors, u, scales) for u in cand.units) / len(cand.units)
            for cand in candidates}


def random_scores(candidates: list[Candidate], seed: int = 0) -> dict[str, float]:
    """Return a seeded uniform random score per candidate (the baseline every criterion must beat)."""
    rng = random.Random(seed)
    return {cand.name: rng.random() for cand in candidates}
