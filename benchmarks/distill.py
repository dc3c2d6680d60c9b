"""Step distillation on the digits testbeds: what a user would pick instead vs what distillation gives.

Rows: the teacher with its own DDIM (CFG 1.5) at 100/50/25 steps and with trailing DDIM at 4/2/1,
DPM-Solver++ (diffusers' DPMSolverMultistepScheduler, thresholding on) at 8/4/2, a guidance-distilled model
(one call per step), progressive students at 8/4/2/1 (one chain of halving rounds from 16), adversarial
students (frozen-teacher and fresh discriminators), progressive + adversarial, and a 1.99-bit 4-step
student. Every model samples the same prompts from the same seeded noise; each sampling seed gives one
measurement, and the table shows mean and σ over seeds. CPU time per image is measured in this run,
all rows on the same machine, as a ratio to the 50-step teacher.

    .venv/bin/python benchmarks/distill.py --testbed digits --rows teacher,dpm,progressive --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxpress  # noqa: E402
from fxpress.frontends import zoo  # noqa: E402
from fxpress.ir.sampler import SamplerSpec, trailing_timesteps  # noqa: E402
from fxpress.testbed.models import load_testbed  # noqa: E402
from fxpress.testbed.quality import classify, frechet_distance  # noqa: E402
from fxpress.testbed.sampling import sample_images, sample_with, seeded_noise, training_scheduler  # noqa: E402

ROWS = ("teacher", "dpm", "guidance", "progressive", "adversarial", "ablation", "combo", "lowbit")
ZOO = {"digits": "testbed-digits-unet", "digits-dit": "testbed-digits-dit"}


def dpm_images(testbed, model, cond, uncond, steps: int, seed: int, guidance: float) -> torch.Tensor:
    """DPM-Solver++ (2nd order multistep, thresholding on) with CFG, from the same seeded noise."""
    from diffusers import DPMSolverMultistepScheduler

    spec = testbed.spec
    config = dict(training_scheduler(spec.prediction).config)
    scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", thresholding=True,
                                                        sample_max_value=1.0)
    scheduler.set_timesteps(steps)
    x = seeded_noise(cond.shape[0], (spec.channels, spec.resolution, spec.resolution), seed) \
        * scheduler.init_noise_sigma
    from fxpress.testbed.sampling import guided_noise

    with torch.no_grad():
        for t in scheduler.timesteps:
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
            x = scheduler.step(guided_noise(model, x, tt, cond, uncond, guidance, spec.sample_input), t, x).prev_sample
    return x.clamp(-1, 1)


def measure(testbed, images: torch.Tensor, wanted: torch.Tensor, real_features) -> dict:
    predicted, features = classify(testbed, images)
    return {"accuracy": float((predicted["digit"] == wanted).float().mean()),
            "frechet": frechet_distance(features, real_features)}


def evaluate_row(testbed, draw, seeds: list[int], per_prompt: int) -> dict:
    """Return mean/σ of accuracy and Fréchet distance over `seeds`, and the CPU seconds per image."""
    prompts = testbed.spec.prompts()
    captions = [text for text, _ in prompts for _ in range(per_prompt)]
    wanted = torch.tensor([f["digit"] for _, f in prompts for _ in range(per_prompt)])
    cond, uncond = testbed.encode(captions), testbed.encode([""])
    _, real = classify(testbed, testbed.spec.load_split("test").images)
    runs, seconds = [], 0.0
    for seed in seeds:
        start = time.perf_counter()
        images = draw(cond, uncond, seed * 100_000)
        seconds += time.perf_counter() - start
        runs.append(measure(testbed, images, wanted, real))
    out = {"seeds": seeds, "samples": len(captions), "seconds_per_image": seconds / (len(seeds) * len(captions))}
    for key in ("accuracy", "frechet"):
        values = [r[key] for r in runs]
        out[key] = statistics.mean(values)
        out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[f"{key}_runs"] = values
    return out


def distill(entry, model, example, data, method: str, out: Path, **settings) -> tuple:
    """Distil with the `distill` recipe, save the artifact, return (loaded model, sampler, report)."""
    start = time.perf_counter()
    result = fxpress.compress(model, example, "distill", training_data=data, method=method, verify=False,
                              calibration_inputs=entry.calibration_inputs(2), **settings)
    seconds = time.perf_counter() - start
    fxpress.save(result, out, overwrite=True, plot=False)
    loaded = fxpress.load(out)
    spec = SamplerSpec.from_json(result.graph.extras["sampler"])
    steps = sum(p.details.get("train_steps", p.details.get("steps", 0)) for p in result.report.passes
                if p.name.endswith("Distill"))
    return loaded, spec, {"train_steps": steps, "train_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", choices=tuple(ZOO), default="digits")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated groups of {ROWS}")
    parser.add_argument("--seeds", default="0,1,2", help="sampling seeds (one measurement each)")
    parser.add_argument("--per-prompt", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=400, help="per progressive round; adversarial: total")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--work", default="artifacts/distill", help="where the distilled artifacts are written")
    parser.add_argument("--json", default=None, help="append each row as a JSON line here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, seeds = args.rows.split(","), [int(s) for s in args.seeds.split(",")]
    entry = zoo.get(ZOO[args.testbed])
    testbed = load_testbed(entry.testbed)
    model, example, data = entry.build(), entry.example_inputs(), entry.training_data()
    shape = (testbed.spec.channels, testbed.spec.resolution, testbed.spec.resolution)
    work = Path(args.work) / args.testbed
    g = args.guidance
    common = {"batch": args.batch, "lr": args.lr, "guidance": [g, g], "guidance_scale": g}
    results = []

    def row(label: str, calls: int, draw, extra: dict | None = None) -> None:
        r = {"row": label, "calls": calls, **evaluate_row(testbed, draw, seeds, args.per_prompt), **(extra or {})}
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"testbed": args.testbed, **r}) + "\n")

    def ddim(steps: int):
        return lambda c, u, s: sample_images(model, c, u, shape, steps=steps, guidance=g, seed=s,
                                             sample_input=testbed.spec.sample_input, prediction=testbed.spec.prediction)

    def spec_draw(spec: SamplerSpec, net):
        return lambda c, u, s: sample_with(spec, net, c, u, shape, seed=s)

    if "teacher" in rows:
        for steps in (100, 50, 25):
            row(f"teacher DDIM {steps}", 2 * steps, ddim(steps))
        base = SamplerSpec.from_scheduler(training_scheduler(testbed.spec.prediction), 1, guidance_scale=g,
                                          sample_input=testbed.spec.sample_input)
        for steps in (4, 2, 1):
            spec = base.with_timesteps(trailing_timesteps(1000, steps))
            row(f"teacher DDIM {steps} (trailing)", 2 * steps, spec_draw(spec, model))
    if "dpm" in rows:
        for steps in (8, 4, 2):
            row(f"teacher DPM-Solver++ {steps}", 2 * steps,
                lambda c, u, s, n=steps: dpm_images(testbed, model, c, u, n, s, g))
    if "guidance" in rows:
        net, spec, info = distill(entry, model, example, data, "guidance", work / "guidance",
                                  distill={**common, "guidance": [1.0, 3.0], "steps": 25,
                                           "train_steps": args.train_steps})
        row("guidance-distilled DDIM 25", 25, spec_draw(spec, net), info)
    if "progressive" in rows:
        teacher_steps, previous = 16, None
        for steps in (8, 4, 2, 1):
            source = model if previous is None else fxpress.load_trainable(previous)
            net, spec, info = distill(entry, source, example, data, "progressive", work / f"progressive{steps}",
                                      distill={**common, "steps": steps, "teacher_steps": teacher_steps,
                                               "train_steps": args.train_steps})
            row(f"progressive {steps}", steps, spec_draw(spec, net), info)
            teacher_steps, previous = steps, work / f"progressive{steps}"
    if "adversarial" in rows or "ablation" in rows:
        kinds = ["teacher"] + (["fresh"] if "ablation" in rows else [])
        for kind in kinds:
            for steps in ((4, 2, 1) if kind == "teacher" else (4,)):
                net, spec, info = distill(entry, model, example, data, "adversarial", work / f"adv-{kind}{steps}",
                                          distill={**common, "steps": steps, "teacher_steps": 25,
                                                   "discriminator": kind, "train_steps": args.train_steps})
                row(f"adversarial {steps} ({kind} discriminator)", steps, spec_draw(spec, net), info)
    if "combo" in rows:
        source = work / "progressive4"
        if source.is_dir():
            net, spec, info = distill(entry, fxpress.load_trainable(source), example, data, "adversarial",
                                      work / "prog-adv4", teacher=model,
                                      distill={**common, "steps": 4, "teacher_steps": 25,
                                               "train_steps": args.train_steps})
            row("progressive 4 + adversarial", 4, spec_draw(spec, net), info)
    if "lowbit" in rows:
        net, spec, info = distill(entry, model, example, data, "progressive", work / "lowbit4",
                                  quantize="bitsfusion", target_bits=1.99,
                                  distill={**common, "steps": 4, "teacher_steps": 16, "train_steps": args.train_steps})
        row("1.99-bit progressive 4", 4, spec_draw(spec, net), info)
    reference = next((r for r in results if r["row"] == "teacher DDIM 50"), None)
    print("\n| model | calls/image | sample accuracy | Fréchet distance | CPU time/image (x 50-step) | training |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = r["seconds_per_image"] / reference["seconds_per_image"] if reference else float("nan")
        train = f"{r['train_steps']} steps, {r['train_seconds']:.0f} s" if "train_steps" in r else "-"
        print(f"| {r['row']} | {r['calls']} | {r['accuracy']:.1%} ± {r['accuracy_sd']:.1%} | "
              f"{r['frechet']:.1f} ± {r['frechet_sd']:.1f} | {r['seconds_per_image'] * 1e3:.2f} ms ({ratio:.3f}) | "
              f"{train} |")


if __name__ == "__main__":
    main()
