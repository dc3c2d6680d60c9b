"""How much each pruning candidate matters: KD-guided (distillation loss rise when masked), magnitude, random.

KD-guided is the mobile-DiT paper's criterion: the student is the model with the candidate masked,
the teacher the unmasked model; the loss is the output MSE plus the block-feature MSE (each divided by
the teacher's variance), averaged over calibration inputs at several timesteps.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fxpress.ir.graph import output_tensors
from fxpress.passes.distill.features import FeatureTap, block_modules
from fxpress.passes.prune.bypass import StreamArg
from fxpress.passes.prune.candidates import Candidate, masked, unit_magnitude


class DistillTarget:
    """The teacher's outputs and block features on fixed inputs, and the KD loss of a student on them."""

    def __init__(self, teacher: nn.Module, inputs: list[dict], feature_weight: float = 1.0):
        self.inputs, self.feature_weight = inputs, feature_weight
        self.outputs, self.features = self._run(teacher)

    @torch.no_grad()
    def _run(self, model: nn.Module) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        outputs, features = [], []
        for kwargs in self.inputs:
            tap = FeatureTap(block_modules(model)) if self.feature_weight else None
            outputs.append(output_tensors(model(**kwargs))[0])
            if tap is not None:
                tap.close()
                features.append(dict(tap.values))
            else:
                features.append({})
        return outputs, features

    def loss(self, student: nn.Module) -> float:
        """Return the mean KD loss of `student` (output plus weighted block features, variance-normalised)."""
        outputs, features = self._run(student)
        total = 0.0
        for out, ref, feats, refs in zip(outputs, self.outputs, features, self.features):
            total += float(F.mse_loss(out, ref) / ref.var().clamp_min(1e-12))
            shared = [k for k in refs if k in feats and feats[k].shape == refs[k].shape]
            if shared:
                total += self.feature_weight * sum(
                    float(F.mse_loss(feats[k], refs[k]) / refs[k].var().clamp_min(1e-12)) for k in shared) / len(shared)
        return total / len(self.inputs)


def kd_scores(model: nn.Module, candidates: list[Candidate], target: DistillTarget,
              streams: dict[str, StreamArg], progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Return, per candidate, the KD loss of `model` with that candidate masked (the rise over unmasked)."""
    base = target.loss(model)
    scores = {}
    for i, cand in enumerate(candidates):
        with masked(model, [cand], streams):
            scores[cand.name] = target.loss(model) - base
        if progress is not None:
            progress(i + 1)
    return scores


def kd_joint(model: nn.Module, target: DistillTarget,
             streams: dict[str, StreamArg]) -> Callable[[list[Candidate]], float]:
    """Return a function giving the KD loss rise of `model` with several candidates masked together."""
    base = target.loss(model)

    def joint(candidates: list[Candidate]) -> float:
        with masked(model, candidates, streams):
            return target.loss(model) - base

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
