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


def resolve_model(name: str, testbed: str | None):
    """Return (testbed name, denoiser, label) for a testbed zoo name or an artifact directory."""
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
        label = f"{path.name}" + (f" ({bits:.2f} bits)" if bits else "")
        return testbed, load(path), label
    if name in zoo.ZOO:
        own = _testbed_of(name)
        if own is None:
            raise FxpressError(f"zoo model {name!r} is untrained (random weights); quality needs a testbed model")
        return testbed or own, zoo.get(name).build(), f"{name} (fp32)"
    raise FxpressError(f"{name!r} is neither an artifact directory nor a testbed zoo model")


def run_quality(args: argparse.Namespace, console: Console) -> int:
    """Evaluate every model on the same prompts and seeds; print a table, write the PNG grid."""

    from fxpress.testbed.grid import grid_png
    from fxpress.testbed.models import load_testbed
    from fxpress.testbed.quality import evaluate

    resolved = [resolve_model(m, args.testbed) for m in args.models]
    names = {t for t, _, _ in resolved}
    if len(names) > 1:
        raise FxpressError(f"the models come from different testbeds {sorted(names)}; compare one at a time")
    testbed = load_testbed(names.pop())
    table = Table(title=f"quality on the {testbed.spec.name} testbed")
    for col in ("model", "sample accuracy", "Fréchet distance", "denoising MSE", "samples", "seconds"):
        table.add_column(col, justify="left" if col == "model" else "right")
    panels, results = {}, {}
    for _, model, label in resolved:
        with console.status(f"sampling {label} …"):
            quality, images = evaluate(testbed, model, per_prompt=args.per_prompt, seed=args.seed,
                                       steps=args.steps, guidance=args.guidance)
        per_factor = ", ".join(f"{k} {v:.1%}" for k, v in quality.factor_accuracy.items())
        table.add_row(label, f"{quality.accuracy:.1%}" + (f" ({per_factor})" if len(quality.factor_accuracy) > 1
                                                          else ""),
                      f"{quality.frechet:.3f}", f"{quality.denoise_mse:.5f}", str(quality.samples),
                      f"{quality.seconds:.1f}")
        panels[label], results[label] = images, quality.to_json()
    console.print(table)
    s = quality.settings
    console.print(f"DDIM {s['steps']} steps, CFG {s['guidance']}, seeds {s['seed']}..; Fréchet distance on the "
                  f"classifier's features against {s['heldout']} held-out images")
    prompts = [text for text, _ in testbed.spec.prompts()]
    png = Path(args.png or "samples.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(grid_png(panels, len(prompts), columns=min(8, args.per_prompt), labels=prompts))
    console.print(f"samples: {png}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0
