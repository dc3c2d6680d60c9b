"""Benchmark probe: what the SR-CN control branch reads besides the pose map (issue 21).

The control branch of `benchmarks/sr_adapters.py` is trained once on the base data and frozen; the identity
adapter then trains beside it with size-only prompts. If the branch's residuals depend on the caption's
identity words (shape, colour), it pushes identity features of its own under those prompts and the adapter
learns to work against them. This probe measures that dependence for branches trained with each caption
factor dropout: for base images, one noisy sample, timestep and pose map each, the relative L2 change of
the branch's residuals (every down-block residual and the mid one, concatenated) when the caption loses
its shape and colour words, when it is empty, and, for scale, when the pose maps are shuffled.

Run: .venv/bin/python benchmarks/sr_control_probe.py  (defaults: dropouts 0 and 0.5, 64 images; branches
     come from --cache, trained there if absent: ~2 min each on 2 cores)
Writes benchmarks/results/sr_control_probe.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("FXPRESS_QUIET", "1")

import torch  # noqa: E402
from sr_adapters import RESULTS, captured_denoiser, datetime_now, pretrained_control  # noqa: E402

from fxpress.testbed import identity, shapes  # noqa: E402
from fxpress.testbed.models import Testbed, load_testbed  # noqa: E402
from fxpress.testbed.sampling import training_scheduler  # noqa: E402

TIMESTEPS = (100, 500, 900)


@torch.no_grad()
def dependence(testbed: Testbed, control, base, count: int, seed: int = 0) -> dict[int, dict[str, float]]:
    """Per timestep, the relative L2 change of the branch's residuals under each caption or pose change."""
    x0, poses = base.images[:count], identity.pose_maps(base)[:count]
    factors = {k: [int(v) for v in base.factors[k][:count]] for k in ("shape", "colour", "size")}
    full = [shapes.describe({k: factors[k][i] for k in factors}) for i in range(count)]
    size_only = [identity.training_prompt(s) for s in factors["size"]]
    scheduler, gen = training_scheduler(testbed.spec.prediction), torch.Generator().manual_seed(seed)

    def residuals(noisy, t, captions, pose) -> torch.Tensor:
        down, mid = control(noisy, t, testbed.encode(captions), controlnet_cond=pose, return_dict=False)
        return torch.cat([r.flatten(1) for r in down] + [mid.flatten(1)], 1)

    out = {}
    for step in TIMESTEPS:
        t = torch.full((count,), step)
        noisy = scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        ref = residuals(noisy, t, full, poses)
        scale = ref.norm(dim=1).mean()
        changed = {"identity words left out": residuals(noisy, t, size_only, poses),
                   "empty caption": residuals(noisy, t, [""] * count, poses),
                   "pose maps shuffled": residuals(noisy, t, full, poses.roll(1, 0))}
        out[step] = {k: float((v - ref).norm(dim=1).mean() / scale) for k, v in changed.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--control-steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fxpress_sr_cache"))
    parser.add_argument("--out", type=Path, default=RESULTS / "sr_control_probe.md")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    args.cache.mkdir(parents=True, exist_ok=True)
    testbed = load_testbed("shapes")
    base = testbed.spec.load_split("train")
    graph = captured_denoiser(testbed)
    lines = [f"# What the SR-CN control branch reads besides the pose ({datetime_now()})", "",
             f"Command: `python benchmarks/sr_control_probe.py {' '.join(sys.argv[1:])}`. Relative L2 change of "
             f"the control branch's residuals for {args.images} base images (one noisy sample per image and "
             "timestep) when the full caption (shape, colour, size) loses its shape and colour words, is empty, "
             "or the pose maps are shuffled. Branches trained "
             f"{args.control_steps} steps, batch {args.batch}, with each caption factor dropped with the given "
             "probability.", "", "| factor dropout | t | identity words left out | empty caption | pose maps "
             "shuffled |", "|---|---|---|---|---|"]
    for dropout in args.dropouts:
        control = pretrained_control(testbed, graph, base, args.control_steps, args.batch, args.cache, dropout).eval()
        for step, row in dependence(testbed, control, base, args.images).items():
            lines.append(f"| {dropout} | {step} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
            print(dropout, step, row, flush=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
