"""`TriLevelPrune`: the mobile-DiT paper's structured pruning as a pass (blocks, heads, channels).

Greedy, latency-aware removal scored by KD (or magnitude / random), optional KD recovery of each
round's candidate plans before they are compared, between rounds and after the last one (needs the
context's training data), then the pruned model is captured
again so later passes (quantization) see the new shapes. The report lists what each level lost and
the measured CPU latency of the whole model before and after, and per round how its candidates were
scored, how many KD losses that took and how long the round ran. Every long phase shows a progress bar
with an estimate (silent under FXPRESS_QUIET / --quiet).
"""

from __future__ import annotations

import copy

from torch import nn

from fxpress.errors import PassError
from fxpress.ir.graph import Graph
from fxpress.passes.base import PassResult
from fxpress.passes.context import PassContext
from fxpress.passes.progress import progress_bar
from fxpress.passes.prune.costs import latencies_in_turns
from fxpress.passes.prune.recovery import recover
from fxpress.passes.prune.schedule import PruneConfig, greedy_prune
from fxpress.passes.training_pass import TrainingPass


class TriLevelPrune(TrainingPass):
    """Prune whole blocks, attention heads and channel groups to a latency, FLOPs or parameter budget."""

    provides = ("pruned",)
    transforms = True
    needs_teacher = False  # its teacher is the model as this pass receives it

    def __init__(self, config: PruneConfig, recovery_steps: int = 0, round_recovery_steps: int = 0,
                 batch: int = 32, lr: float = 1e-4, latency_repeats: int = 10, trial_recovery_steps: int = 0):
        self.config = config
        self.recovery_steps, self.round_recovery_steps = recovery_steps, round_recovery_steps
        self.trial_recovery_steps = trial_recovery_steps
        self.batch, self.lr, self.latency_repeats = batch, lr, latency_repeats

    def train(self, graph: Graph, context: PassContext) -> PassResult:
        data = None
        if self.recovery_steps or self.round_recovery_steps or self.trial_recovery_steps:
            data = context.require_data(self.name, "KD recovery")
        if graph.example.args:
            raise PassError("pruning needs the model's inputs as keyword arguments", self.name)
        if any(c.args for c in graph.calibration):
            raise PassError("pruning needs calibration inputs as keyword arguments", self.name)
        teacher = copy.deepcopy(graph.module).eval()

        def between(model: nn.Module, index: int) -> None:
            if self.round_recovery_steps:
                recover(model, teacher, data, self.round_recovery_steps, batch=self.batch,
                        lr=self.lr, feature_weight=self.config.feature_weight, seed=self.config.seed + index)

        def trial(model: nn.Module) -> None:
            recover(model, teacher, data, self.trial_recovery_steps, batch=self.batch, lr=self.lr,
                    feature_weight=self.config.feature_weight, seed=self.config.seed + 500)

        result = greedy_prune(graph, self.config, between, trial if self.trial_recovery_steps else None)
        losses = recover(result.model, teacher, data, self.recovery_steps, batch=self.batch,
                         lr=self.lr, feature_weight=self.config.feature_weight, seed=self.config.seed + 1000) \
            if self.recovery_steps else []
        timed = self.config.timing_inputs(graph.example)
        latency_before, latency_after = latencies_in_turns([graph.module, result.model], timed, self.latency_repeats)
        with progress_bar("capturing the pruned model", 1) as advance:
            pruned = graph.recapture(result.model)
            advance()
        pruned.extras["structure"] = result.structure()
        removed: dict[str, int] = {}
        for record in result.rounds:
            for level, names in record.removed.items():
                removed[level] = removed.get(level, 0) + len(names)
        params = (sum(p.numel() for p in graph.module.parameters()), sum(p.numel() for p in result.model.parameters()))
        report = {
            "budget": f"{self.config.cost}={self.config.budget}", "scorer": self.config.scorer,
            "ranked_by": self.config.rank_by or self.config.cost, "budget_met": result.met,
            "cost_goal": result.goal, "cost_final": result.final_cost,
            "latency_batch": timed.batch_size,
            "removed": removed, "blocks_removed": sorted(result.bypassed),
            "rounds": [{"removed": r.removed, "cost_before": r.cost_before, "cost_after": r.cost_after,
                        "latency_factors": r.latency_factors, "candidates": r.candidates, "scoring": r.scoring,
                        "kd_losses": r.kd_losses, "seconds": r.seconds} for r in result.rounds],
            "refused_blocks": {k: v for r in result.rounds for k, v in r.refused_blocks.items()},
            "params_before": params[0], "params_after": params[1],
            "latency_before_s": latency_before, "latency_after_s": latency_after,
            "measured_speedup": latency_before / latency_after,
            "recovery_final_loss": losses[-1] if losses else None,
        }
        return PassResult(pruned, True, report)
