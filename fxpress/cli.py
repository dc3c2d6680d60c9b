"""The `fxpress` command: compress, distill, inspect, export, bench, profile, zoo."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fxpress.cli_bench import add_bench_parser
from fxpress.cli_distill import add_distill_parser
from fxpress.cli_export import add_export_parser
from fxpress.cli_rewire import add_rewire_parsers
from fxpress.cli_tune import add_tune_parsers
from fxpress.errors import FxpressError, RecipeError
from fxpress.output import quiet, set_quiet

console = Console(width=max(Console().width, 150))


def _compress(args: argparse.Namespace) -> int:

    from fxpress.api import compress, save
    from fxpress.frontends import zoo
    from fxpress.frontends.model_sources import resolve_model
    from fxpress.ir.artifact import check_writable
    from fxpress.recipes import make_recipe

    check_writable(args.out, args.overwrite)  # refused before any work, not after it
    overrides = {"target_bits": args.target_bits, "eta": args.eta, "sensitivity": args.sensitivity}
    if args.budget_mb is not None:
        overrides.update(budget_bytes=int(args.budget_mb * 1e6), target_bits=None)
    if args.qat is not None:
        overrides["qat"] = _qat_steps(args.qat)
    if args.budget is not None:
        overrides.update(_prune_budget(args.budget))
    overrides.update(scorer=args.scorer, rank_by=args.rank_by, latency_batch=args.latency_batch,
                     recovery_steps=args.recovery, trial_recovery_steps=args.trial_recovery, quantize=args.then)
    recipe = make_recipe(args.recipe, **{k: v for k, v in overrides.items() if v is not None})
    entry = resolve_model(args.model, args.component)
    training_data = getattr(entry, "training_data", None)
    if recipe.trains and training_data is None:
        raise FxpressError(f"{args.model} has no training data for QAT or KD recovery; use a testbed model "
                           f"({', '.join(n for n, e in zoo.ZOO.items() if hasattr(e, 'training_data'))})")
    start = time.perf_counter()
    model = entry.build(seed=args.seed)
    example = entry.example_inputs(seed=args.seed)
    if not quiet():
        console.log(f"built {args.model}: {sum(p.numel() for p in model.parameters()):,} params "
                    f"in {time.perf_counter() - start:.1f} s")
    calibration = entry.calibration_inputs(getattr(recipe, "calibration", 1)) if training_data else None
    result = compress(model, example, recipe, verify=not args.no_verify, calibration_inputs=calibration,
                      training_data=training_data() if recipe.trains else None)
    result.summary["model"] = args.model
    result.summary["origin"] = entry.origin
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, the main process writes the artifact
        return 0
    info = save(result, args.out, overwrite=args.overwrite)
    _print_report(result, info, time.perf_counter() - start)
    return 0


def _qat_steps(text: str) -> dict:
    """Parse --qat 'STAGE1,STAGE2' (steps of each QAT stage) into recipe qat settings."""
    try:
        stage1, stage2 = (int(v) for v in text.split(","))
    except ValueError:
        raise RecipeError(f"--qat takes two step counts 'STAGE1,STAGE2', got {text!r}") from None
    return {"stage1_steps": stage1, "stage2_steps": stage2}


def _prune_budget(text: str) -> dict:
    """Parse --budget 'COST=FRACTION' (latency=0.5, flops=0.5, params=0.4) into recipe fields."""
    cost, _, value = text.partition("=")
    try:
        return {"cost": cost.strip(), "budget": float(value)}
    except ValueError:
        raise RecipeError(f"--budget takes COST=FRACTION such as latency=0.5, got {text!r}") from None


def _print_report(result, info, seconds: float) -> None:
    table = Table(title="passes")
    for col in ("pass", "seconds", "changed", "output rel. error", "details"):
        table.add_column(col)
    for p in result.report.passes:
        details = {k: v for k, v in p.details.items() if k not in ("kept", "cached")}
        table.add_row(p.name, f"{p.seconds:.1f}", "yes" if p.modified else "no",
                      "-" if p.rel_error is None else f"{p.rel_error:.4g}", json.dumps(details)[:90])
    console.print(table)
    summary = result.summary
    bits = summary["weights_only_bits"]
    quantized = "no weights quantized" if math.isnan(bits) else f"{bits:.4f} bits per quantized weight (log2 levels)"
    target = getattr(result.recipe, "target_bits", None)
    if target is not None and not math.isnan(bits):
        quantized += f" for a target of {target:g}"
    ratio = info["total_params"] * 2 / info["bytes"]
    versus = f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"
    console.print(
        f"[bold]{summary.get('model', '')}[/bold] → {info['path']}: {info['bytes'] / 1e6:,.2f} MB, {quantized}, "
        f"{info['artifact_bits_per_param']:.3f} artifact bits per parameter, "
        f"fp16 size {info['total_params'] * 2 / 1e6:,.1f} MB "
        f"({versus}); output rel. error "
        f"{summary.get('output_rel_error', float('nan')):.4g}; {seconds:.1f} s")


def _inspect(args: argparse.Namespace) -> int:
    from fxpress.ir.artifact import artifact_bytes, read_manifest

    manifest = read_manifest(args.dir)
    lowbit = manifest.get("lowbit_layers", {})
    table = Table(title=f"{args.dir}: {manifest['source'].get('class', '?')}")
    for col in ("layer", "width", "levels", "params", "stored bits/w", "sensitivity", "weight rel. error"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    total_w = total_bits = 0.0
    for path, ann in manifest.get("annotations", {}).items():
        quant = ann.get("quant")
        entry = lowbit.get(path)
        params = 1
        for s in (entry or {}).get("weight_shape", []):
            params *= s
        if quant and entry:
            stored = entry["coded_bytes"] * 8 / params
            total_w, total_bits = total_w + params, total_bits + entry["coded_bytes"] * 8
            key = f"{quant['grid'][0]}{quant['bits']}"
            sens = ann.get("sensitivity", {})
            mode = next(iter(sens), None)
            value = sens[mode]["error"].get(key) if mode else None
            table.add_row(path, f"{quant['bits']} ({quant['grid']})", str(entry["levels"]), f"{params:,}",
                          f"{stored:.3f}", "-" if value is None else f"{value:.3g}",
                          f"{ann.get('weight_error') or 0:.3g}")
        else:
            table.add_row(path, ann.get("keep_reason") or "fp", "-", "-", "-", "-", "-")
    console.print(table)
    _print_branches(manifest)
    size = artifact_bytes(args.dir)
    summary = manifest.get("summary", {})
    console.print(f"{size / 1e6:,.2f} MB on disk; weight codes {total_bits / 8e6:,.2f} MB = "
                  f"{total_bits / max(total_w, 1):.4f} stored bits per quantized weight "
                  f"(allocated {summary.get('weights_only_bits', float('nan')):.4f})")
    return 0


def _print_branches(manifest: dict) -> None:
    """Print the artifact's branches: kind, role, scale, layers wrapped, parameters."""
    branches = manifest.get("branches") or {}
    if not branches:
        return
    table = Table(title="branches")
    for col in ("branch", "kind", "role", "scale", "layers", "parameters", "fused", "detail"):
        table.add_column(col, justify="left" if col in ("branch", "kind", "role", "detail") else "right")
    for name, entry in branches.items():
        if entry["kind"] == "lora":
            detail = f"rank {entry['rank']}, alpha {entry['alpha']:g}"
        elif entry["kind"] == "control":
            detail = f"input {entry['input']!r} ({entry['channels']} channels)"
        else:
            detail = f"input {entry['input']!r} ({entry['features']} features -> {entry['tokens']} tokens)"
        layers = len(entry.get("targets", [])) + len(entry.get("merged", []))
        table.add_row(name, entry["kind"], entry["role"], f"{entry['scale']:g}", str(layers),
                      f"{entry.get('params', 0):,}", "yes" if entry.get("fused") else "no", detail)
    console.print(table)


def _profile(args: argparse.Namespace) -> int:
    from fxpress.frontends.capture import capture
    from fxpress.frontends.model_sources import resolve_model

    entry = resolve_model(args.model, args.component)
    example = entry.example_inputs()
    capture(entry.build(), example.args, example.kwargs).profile(console)
    return 0


def _zoo(args: argparse.Namespace) -> int:
    from fxpress.frontends.zoo import ZOO

    for name, entry in ZOO.items():
        console.print(f"{name:10s} {entry.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `fxpress` command."""
    parser = argparse.ArgumentParser(prog="fxpress", description="Compress diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="compress a zoo model into an artifact directory")
    c.add_argument("model", help="zoo name (see `fxpress zoo`), model folder, pipeline folder (with --component) "
                                 "or package.module:factory")
    c.add_argument("--component", default=None,
                   help="the pipeline folder's model to compress: unet, transformer, text_encoder, vae, ...")
    c.add_argument("--recipe", default="bitsfusion", help="bitsfusion, uniform, trilevel, or a recipe .toml file")
    c.add_argument("--target-bits", type=float, default=None, help="average log2(levels) per quantized weight")
    c.add_argument("--budget-mb", type=float, default=None, help="artifact byte budget instead of a bit target")
    c.add_argument("--eta", type=float, default=None, help="parameter-size factor of the allocator")
    c.add_argument("--sensitivity", choices=("local", "hybrid", "e2e"), default=None)
    c.add_argument("--qat", default=None, metavar="STAGE1,STAGE2",
                   help="quantization-aware training with these step counts (testbed models; a recipe's [qat] "
                        "table sets the rest)")
    c.add_argument("--budget", default=None, metavar="COST=FRACTION",
                   help="trilevel recipe: keep this fraction of latency, flops or params (e.g. latency=0.5)")
    c.add_argument("--scorer", choices=("kd", "magnitude", "random"), default=None,
                   help="trilevel recipe: what decides which blocks, heads and channels go")
    c.add_argument("--rank-by", choices=("latency", "flops", "params"), default=None,
                   help="trilevel recipe: rank by score per saved latency/flops/params (default: the budget's cost)")
    c.add_argument("--latency-batch", type=int, default=None, metavar="N",
                   help="trilevel recipe: time latency at this batch (the example inputs tiled; the batch the "
                        "model will serve at)")
    c.add_argument("--recovery", type=int, default=None, metavar="STEPS",
                   help="trilevel recipe: KD recovery steps after pruning (testbed models)")
    c.add_argument("--trial-recovery", type=int, default=None, metavar="STEPS",
                   help="trilevel recipe: KD recovery steps of each round's candidate plans before they are "
                        "compared (KD scorer, testbed models)")
    c.add_argument("--then", choices=("bitsfusion", "uniform"), default=None,
                   help="trilevel recipe: quantize the pruned model with this recipe's defaults")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="artifact directory to write")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--no-verify", action="store_true", help="skip the per-pass output check")
    c.set_defaults(func=_compress)
    i = sub.add_parser("inspect", help="per-layer table of an artifact")
    i.add_argument("dir")
    i.set_defaults(func=_inspect)
    add_distill_parser(sub, console, _print_report)
    add_rewire_parsers(sub, console)
    add_export_parser(sub, console)
    add_tune_parsers(sub, console)
    add_bench_parser(sub, console)

    p = sub.add_parser("profile", help="per-layer shapes, FLOPs and bytes of a zoo model")
    p.add_argument("model", help="zoo name, model folder, pipeline folder (with --component) or package.module:factory")
    p.add_argument("--component", default=None, help="the pipeline folder's model to profile")
    p.set_defaults(func=_profile)
    z = sub.add_parser("zoo", help="list the built-in models")
    z.set_defaults(func=_zoo)
    for command in (parser, *sub.choices.values()):  # before or after the command: `fxpress --quiet compress ...`
        default = False if command is parser else argparse.SUPPRESS
        command.add_argument("--quiet", action="store_true", default=default,
                             help="no progress bars or log lines (also FXPRESS_QUIET=1); errors and results print")
        command.add_argument("--debug", action="store_true", default=default,
                             help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for an fxpress error)."""
    import torch

    args = build_parser().parse_args(argv)
    if args.quiet:
        set_quiet()
    errors = Console(stderr=True, soft_wrap=True)  # one line per error, however long
    try:
        with torch.no_grad():  # commands only infer; training passes turn gradients on themselves
            return args.func(args)
    except FxpressError as exc:
        if args.debug:
            raise
        errors.print(f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        errors.print("[red]interrupted[/red]: nothing was written")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        errors.print(f"[red]unexpected error:[/red] {type(exc).__name__}: {escape(first)} (a bug in fxpress; run again "
                     "with --debug for the traceback and report it)", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
