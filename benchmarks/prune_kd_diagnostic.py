"""Diagnostic: how close KD tri-level and KD block-only pruning of the digits DiT stay to the teacher.

Prunes testbed-digits-dit to half its latency twice (KD tri-level with 40-step plan trials, KD blocks
only), then, before and after the same 300-step KD recovery, prints the normalised MSE to the teacher
on 128 held-out images at 8 timesteps: of the output, of output plus block features, of the guidance
direction (conditional minus unconditional output) and of the unconditional output, next to the
sample accuracy and Fréchet distance (300 samples).

Latency is timed at batch 2 by default, the regime where tri-level lost to block removal on sample
accuracy (`--latency-batch 64` for the ablation's default).

Run: .venv/bin/python benchmarks/prune_kd_diagnostic.py   (about 7 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("FXPRESS_QUIET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fxpress.frontends import zoo  # noqa: E402
from fxpress.frontends.capture import capture  # noqa: E402
from fxpress.ir.graph import Inputs, output_tensors  # noqa: E402
from fxpress.passes.context import PassContext  # noqa: E402
from fxpress.passes.prune.recovery import recover  # noqa: E402
from fxpress.passes.prune.schedule import PruneConfig  # noqa: E402
from fxpress.passes.prune.scores import DistillTarget  # noqa: E402
from fxpress.passes.prune.trilevel import TriLevelPrune  # noqa: E402
from fxpress.testbed.models import load_testbed  # noqa: E402
from fxpress.testbed.quality import evaluate  # noqa: E402
from fxpress.testbed.training_data import noisy_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-batch", type=int, default=2, help="batch the latency is timed at")
    args = parser.parse_args()
    entry = zoo.get("testbed-digits-dit")
    testbed, data = load_testbed(entry.testbed), entry.training_data()
    teacher = entry.build()
    example = Inputs.of(entry.example_inputs())
    torch.set_grad_enabled(False)
    held = noisy_inputs(testbed, [int((k + 0.5) * 1000 / 8) for k in range(8)], 7, 16)
    output_only, with_features = DistillTarget(teacher, held, 0.0), DistillTarget(teacher, held, 1.0)
    key = data.condition_input

    def unconditional(kwargs: dict) -> dict:
        return {**kwargs, key: data.unconditional.expand_as(kwargs[key])}

    def error(model: torch.nn.Module, guidance: bool) -> float:
        total = 0.0
        for kwargs in held:
            plain = unconditional(kwargs)
            ref, out = output_tensors(teacher(**plain))[0], output_tensors(model(**plain))[0]
            if guidance:
                ref, out = output_tensors(teacher(**kwargs))[0] - ref, output_tensors(model(**kwargs))[0] - out
            total += float(F.mse_loss(out, ref) / ref.var())
        return total / len(held)

    print("| model | recovery steps | removed | speed-up | output | output + features | guidance direction "
          "| unconditional | sample accuracy | Fréchet distance |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, levels, trial in (("KD tri-level", ("block", "head", "channel"), 40), ("KD blocks only", ("block",), 0)):
        graph = capture(teacher, (), example.kwargs)
        graph.calibration = [Inputs((), c.kwargs) for c in entry.calibration_inputs(4)]
        config = PruneConfig("latency", 0.5, "kd", levels, 16, 4, latency_repeats=30,
                             latency_batch=args.latency_batch)
        with torch.enable_grad():
            result = TriLevelPrune(config, trial_recovery_steps=trial).run(graph, PassContext(training_data=data))
        model, removed = result.graph.module, result.report["removed"]
        parts = "/".join(str(removed.get(k, 0)) for k in ("block", "head", "channel"))
        for steps in (0, 300):
            if steps:
                with torch.enable_grad():
                    recover(model, teacher, data, steps, batch=32, lr=1e-4, seed=1000)
            quality, _ = evaluate(testbed, model, per_prompt=30)
            print(f"| {label} | {steps} | {parts} | {result.report['measured_speedup']:.2f}x | "
                  f"{output_only.loss(model):.4f} | {with_features.loss(model):.4f} | {error(model, True):.3f} | "
                  f"{error(model, False):.4f} | {quality.accuracy:.1%} | {quality.frechet:.1f} |", flush=True)


if __name__ == "__main__":
    main()
