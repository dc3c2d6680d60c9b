"""`fxpress distill`: distil a model's sampler to fewer network calls and write an artifact that samples itself."""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from fxpress.errors import FxpressError, RecipeError


def add_distill_parser(sub, console: Console, report) -> None:
    """Register the `distill` subcommand; `report(result, info, seconds)` prints the pass table and sizes."""
    d = sub.add_parser("distill", help="step-distil a testbed model (guidance, progressive, adversarial)")
    d.add_argument("model", help="testbed zoo model (testbed-digits-unet, ...) or an artifact made from one")
    d.add_argument("--method", default=None,
                   help="guidance, progressive or adversarial, or stages joined by '+' (guidance+progressive)")
    d.add_argument("--steps", type=int, default=None, help="sampler steps of the student (default 4)")
    d.add_argument("--teacher-steps", type=int, default=None,
                   help="progressive: the first teacher's steps (steps x 2^k); adversarial: the teacher "
                        "samples' steps")
    d.add_argument("--train-steps", type=int, default=None, help="training steps (per round, for progressive)")
    d.add_argument("--batch", type=int, default=None)
    d.add_argument("--lr", type=float, default=None)
    d.add_argument("--guidance", default=None, metavar="W or LOW,HIGH",
                   help="guidance weight the student folds, or the range a guidance input is trained on")
    d.add_argument("--discriminator", choices=("teacher", "fresh"), default=None,
                   help="adversarial: frozen teacher blocks or a fresh small network as the feature extractor")
    d.add_argument("--quantize", choices=("bitsfusion", "uniform"), default=None,
                   help="distil a fake-quantized student and freeze it into low-bit layers")
    d.add_argument("--target-bits", type=float, default=None, help="with --quantize: bits per quantized weight")
    d.add_argument("--recipe", default=None, help="a distill recipe .toml (flags given here override it)")
    d.add_argument("--teacher", default=None,
                   help="the model to distil from (zoo name or model folder; default: MODEL itself), e.g. the "
                        "original testbed when MODEL is an artifact distilled already")
    d.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the checkpoints beside --out (OUT.checkpoints)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True, help="artifact directory to write")
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=lambda args: run_distill(args, console, report))


def _guidance(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise RecipeError(f"--guidance takes W or LOW,HIGH, got {text!r}") from None
    if len(values) not in (1, 2):
        raise RecipeError(f"--guidance takes W or LOW,HIGH, got {text!r}")
    return (values[0], values[-1])


def _recipe(args: argparse.Namespace):
    from fxpress.recipes import make_recipe

    table = {"steps": args.steps, "teacher_steps": args.teacher_steps, "train_steps": args.train_steps,
             "batch": args.batch, "lr": args.lr, "discriminator": args.discriminator, "seed": args.seed}
    guidance = _guidance(args.guidance)
    if guidance is not None:
        table["guidance"] = guidance
        table["guidance_scale"] = guidance[1] if guidance[0] == guidance[1] else (guidance[0] + guidance[1]) / 2
    overrides = {"method": args.method, "quantize": args.quantize, "target_bits": args.target_bits,
                 "distill": {k: v for k, v in table.items() if v is not None}}
    base = args.recipe if args.recipe is not None else "distill"
    recipe = make_recipe(base, **{k: v for k, v in overrides.items() if v is not None})
    if recipe.name != "distill":
        raise RecipeError(f"fxpress distill runs distill recipes; {base} is a {recipe.name!r} recipe")
    return recipe


def run_distill(args: argparse.Namespace, console: Console, report) -> int:
    """Distil as `args` say and write the artifact; raises an FxpressError subclass on bad input."""
    from fxpress.api import compress, save
    from fxpress.frontends.model_sources import resolve_model
    from fxpress.ir.artifact import check_writable

    check_writable(args.out, args.overwrite)
    recipe = _recipe(args)
    artifact = Path(args.model).is_dir() and (Path(args.model) / "manifest.json").is_file()
    origin = args.model
    if artifact:
        from fxpress.ir.artifact import read_manifest

        origin = (read_manifest(args.model).get("summary") or {}).get("model") or ""
        recipe = replace(recipe, low_bit_student=True).validate()
    entry = resolve_model(origin) if origin else None
    if entry is None or getattr(entry, "training_data", None) is None:
        raise FxpressError(f"{args.model} has no training data to distil on; use a testbed model or an artifact "
                           "made from one")
    start = time.perf_counter()
    if artifact:
        from fxpress.api import load_trainable

        model = load_trainable(args.model)
    else:
        model = entry.build(seed=args.seed)
    example = entry.example_inputs(seed=args.seed)
    checkpoints = Path(f"{args.out}.checkpoints")
    if args.resume and not checkpoints.is_dir():
        raise FxpressError(f"--resume: no checkpoints at {checkpoints} (a run with the same --out writes them)")
    teacher = resolve_model(args.teacher).build(seed=args.seed) if args.teacher else None
    result = compress(model, example, recipe, calibration_inputs=entry.calibration_inputs(recipe.calibration),
                      training_data=entry.training_data(), checkpoint_dir=checkpoints, resume=args.resume,
                      teacher=teacher)
    result.summary["model"] = origin
    result.summary["origin"] = entry.origin
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    info = save(result, args.out, overwrite=args.overwrite)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the artifact is whole: nothing left to resume
    report(result, info, time.perf_counter() - start)
    sampler = result.graph.extras.get("sampler") or {}
    console.print(f"sampler: {len(sampler.get('timesteps', []))} steps at {sampler.get('timesteps')}, guidance "
                  f"{sampler.get('guidance')} ({2 if sampler.get('guidance') == 'cfg' else 1} network call(s) "
                  f"per step)")
    return 0
