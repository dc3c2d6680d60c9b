"""`fxpress bench quality`: sample a testbed model (trained FP32 or a compressed artifact) and measure it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fxpress.errors import FxpressError


def add_bench_parser(sub, console: Console) -> None:
    """Register `bench quality` on an argparse subparsers object; it prints to `console`."""
    b = sub.add_parser("bench", help="measure models")
    bsub = b.add_subparsers(dest="bench", required=True)
    q = bsub.add_parser("quality", help="sample accuracy, Fréchet distance and denoising MSE on a testbed")
    q.add_argument("models", nargs="+", help="testbed zoo models (testbed-digits-unet, testbed-digits-dit, "
                                             "testbed-shapes-unet) or artifact directories; "
                                             "several are compared on the same seeds, side by side")
    q.add_argument("--testbed", default=None, help="testbed to judge on (default: the one the model came from)")
    q.add_argument("--per-prompt", type=int, default=30, help="samples per evaluation prompt")
    q.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the testbed's)")
    q.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the testbed's)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--png", default=None, help="where to write the sample grid (default: samples.png)")
    q.add_argument("--json", default=None, help="also write the metrics as JSON here")
    q.set_defaults(func=lambda args: run_quality(args, console))


def _testbed_of(name: str) -> str | None:
    from fxpress.frontends.zoo import ZOO, TestbedEntry

    entry = ZOO.get(name)
    return entry.testbed if isinstance(entry, TestbedEntry) else None


def _sampler(manifest: dict, steps: int | None, guidance: float | None, path: Path):
    """Return the sampler an artifact records (None: the testbed's DDIM), at --steps / --guidance where the
    model allows them (a guidance-distilled model samples on any grid; a step-distilled one on its own)."""
    from dataclasses import replace

    from fxpress.ir.sampler import SamplerSpec, trailing_timesteps

    if not manifest.get("sampler"):
        return None
    spec = SamplerSpec.from_json(manifest["sampler"])
    if steps is not None and steps != spec.steps:
        if spec.notes.get("method") in ("progressive", "adversarial"):
            raise FxpressError(f"{path} was distilled to sample in {spec.steps} steps; --steps {steps} would "
                               "sample it on a grid it was not trained for")
        spec = spec.with_timesteps(trailing_timesteps(len(spec.alphas_cumprod), steps))
    if guidance is not None:
        if spec.guidance == "none":
            raise FxpressError(f"{path} folded guidance {spec.guidance_scale} into its weights; it takes no --guidance")
        spec = replace(spec, guidance_scale=guidance)
    return spec


def resolve_model(name: str, testbed: str | None, steps: int | None = None, guidance: float | None = None):
    """Return (testbed name, denoiser, label, sampler or None) for a testbed zoo name or an artifact directory."""
    from fxpress.frontends import zoo
    from fxpress.testbed.specs import TESTBEDS

    path = Path(name)
    if path.is_dir():
        from fxpress.api import load
        from fxpress.ir.artifact import read_manifest

        manifest = read_manifest(path)
        origin = manifest.get("summary", {}).get("model", "")
        testbed = testbed or _testbed_of(origin)
        if testbed is None:
            raise FxpressError(f"{path} was not made from a testbed model (its model is {origin or 'unknown'!r}); "
                               f"pass --testbed {'|'.join(TESTBEDS)}")
        bits = manifest.get("summary", {}).get("weights_only_bits")
        label = f"{path.name}" + (f" ({bits:.2f} bits)" if bits and bits == bits else "")
        return testbed, load(path), label, _sampler(manifest, steps, guidance, path)
    if name in zoo.ZOO:
        own = _testbed_of(name)
        if own is None:
            raise FxpressError(f"zoo model {name!r} is untrained (random weights); quality needs a testbed model")
        return testbed or own, zoo.get(name).build(), f"{name} (fp32)", None
    raise FxpressError(f"{name!r} is neither an artifact directory nor a testbed zoo model")


def run_quality(args: argparse.Namespace, console: Console) -> int:
    """Evaluate every model on the same prompts and seeds; print a table, write the PNG grid."""

    from fxpress.testbed.grid import grid_png
    from fxpress.testbed.models import load_testbed
    from fxpress.testbed.quality import evaluate

    resolved = [resolve_model(m, args.testbed, args.steps, args.guidance) for m in args.models]
    names = {t for t, _, _, _ in resolved}
    if len(names) > 1:
        raise FxpressError(f"the models come from different testbeds {sorted(names)}; compare one at a time")
    testbed = load_testbed(names.pop())
    table = Table(title=f"quality on the {testbed.spec.name} testbed")
    for col in ("model", "sampler", "calls/image", "sample accuracy", "Fréchet distance", "denoising MSE",
                "samples", "seconds"):
        table.add_column(col, justify="left" if col in ("model", "sampler") else "right")
    panels, results = {}, {}
    for _, model, label, sampler in resolved:
        with console.status(f"sampling {label} …"):
            quality, images = evaluate(testbed, model, per_prompt=args.per_prompt, seed=args.seed,
                                       steps=args.steps, guidance=args.guidance, sampler=sampler)
        per_factor = ", ".join(f"{k} {v:.1%}" for k, v in quality.factor_accuracy.items())
        steps = quality.settings["steps"]
        calls = steps * (sampler.calls_per_step if sampler is not None else 2)
        how = (f"{steps} steps, guidance {sampler.guidance} {sampler.guidance_scale:g}" if sampler is not None
               else f"DDIM {steps} steps, CFG {quality.settings['guidance']:g}")
        table.add_row(label, how, str(calls),
                      f"{quality.accuracy:.1%}" + (f" ({per_factor})" if len(quality.factor_accuracy) > 1 else ""),
                      f"{quality.frechet:.3f}", f"{quality.denoise_mse:.5f}", str(quality.samples),
                      f"{quality.seconds:.1f}")
        panels[label], results[label] = images, quality.to_json()
    console.print(table)
    s = quality.settings
    console.print(f"seeds {s['seed']}..; Fréchet distance on the classifier's features against {s['heldout']} "
                  "held-out images; a distilled model samples with its own sampler (its denoising MSE is not "
                  "measured: it was trained for its own timesteps only)")
    prompts = [text for text, _ in testbed.spec.prompts()]
    png = Path(args.png or "samples.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(grid_png(panels, len(prompts), columns=min(8, args.per_prompt), labels=prompts))
    console.print(f"samples: {png}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0
