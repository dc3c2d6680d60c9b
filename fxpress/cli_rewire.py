"""`fxpress rewire`, `fxpress strip`, `fxpress fuse`: add LoRA branches, remove branches, fold LoRA into weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from fxpress.errors import RecipeError


def add_rewire_parsers(sub, console: Console) -> None:
    """Register the `rewire`, `strip` and `fuse` subcommands."""
    r = sub.add_parser("rewire", help="add LoRA branches to a model or artifact and write an artifact")
    r.add_argument("model", help="an artifact folder, a zoo name, a model folder or package.module:factory")
    r.add_argument("--component", default=None, help="the pipeline folder's model to rewire")
    r.add_argument("--lora", action="append", required=True, metavar="SELECTOR",
                   help="layers to wrap (repeatable): a path-suffix regex such as 'attn.*to_(q|k|v|out.0)', or "
                        "re:/glob:/type:/kind: selectors")
    r.add_argument("--rank", type=int, default=8)
    r.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, a factor of 1)")
    r.add_argument("--dropout", type=float, default=0.0)
    r.add_argument("--name", default="lora", help="the branch's name")
    r.add_argument("--role", choices=("adapter", "train_only"), default="adapter",
                   help="adapter: kept for inference; train_only: removed by `fxpress strip`")
    r.add_argument("--scale", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=0)
    _output(r)
    r.set_defaults(func=lambda args: _rewire(args, console))

    s = sub.add_parser("strip", help="remove branches (train-only ones by default) from an artifact")
    s.add_argument("dir", help="artifact folder")
    s.add_argument("--role", choices=("adapter", "train_only"), default="train_only",
                   help="the role of the branches to remove; stripping kept adapters needs --role adapter")
    s.add_argument("--names", default=None, help="comma-separated branch names (default: every branch of --role)")
    _output(s)
    s.set_defaults(func=lambda args: _edit(args, console, "strip"))

    f = sub.add_parser("fuse", help="fold LoRA branches into their base weights (low-bit ones requantized)")
    f.add_argument("dir", help="artifact folder")
    f.add_argument("--names", default=None, help="comma-separated branch names (default: every LoRA branch)")
    _output(f)
    f.set_defaults(func=lambda args: _edit(args, console, "fuse"))


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="artifact directory to write")
    parser.add_argument("--overwrite", action="store_true")


def _is_artifact(text: str) -> bool:
    return Path(text).is_dir() and (Path(text) / "manifest.json").is_file()


def _artifact_graph(directory: str):
    """Capture the model an artifact holds, on the example inputs it recorded."""
    from fxpress.api import load
    from fxpress.frontends.capture import capture
    from fxpress.ir.artifact import read_manifest
    from fxpress.ir.input_spec import inputs_from_spec

    manifest = read_manifest(directory)
    if not manifest.get("inputs"):
        raise RecipeError(f"{directory} records no example inputs (saved by an older fxpress); save it again first")
    model = load(directory)
    example = inputs_from_spec(manifest["inputs"])
    graph = capture(model, example.args, example.kwargs)
    graph.source = manifest.get("source") or {}
    return graph, manifest


def _model_graph(args: argparse.Namespace):
    from fxpress.frontends.capture import capture
    from fxpress.frontends.model_sources import resolve_model

    entry = resolve_model(args.model, args.component)
    example = entry.example_inputs()
    return capture(entry.build(), example.args, example.kwargs), {}


def _save(graph, manifest: dict, args: argparse.Namespace, console: Console, what: str) -> None:
    from fxpress.api import save
    from fxpress.ir.artifact import artifact_bytes

    summary = dict(manifest.get("summary") or {})
    save(graph, args.out, overwrite=args.overwrite, summary=summary or None)
    console.print(f"{what}; wrote {args.out} ({artifact_bytes(args.out) / 1e6:,.2f} MB)")


def _rewire(args: argparse.Namespace, console: Console) -> int:
    from fxpress.ir.artifact import check_writable
    from fxpress.passes.pipeline import Pipeline
    from fxpress.passes.rewire.lora import InsertLoRA

    check_writable(args.out, args.overwrite)
    graph, manifest = _artifact_graph(args.model) if _is_artifact(args.model) else _model_graph(args)
    lora = InsertLoRA(args.lora, rank=args.rank, alpha=args.alpha, dropout=args.dropout, name=args.name,
                      role=args.role, scale=args.scale, seed=args.seed)
    new, report = Pipeline([lora], verify=True).run(graph)
    row = report.passes[0]
    _save(new, manifest, args, console, f"branch {args.name!r} ({args.role}): LoRA rank {args.rank} on "
          f"{row.details['layers']} layers, {row.details['params']:,} parameters; output change at B = 0: "
          f"{row.rel_error:.3g}")
    return 0


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise RecipeError(f"--names takes comma-separated branch names, got {text!r}")
    return names


def _edit(args: argparse.Namespace, console: Console, action: str) -> int:
    from fxpress.ir.artifact import check_writable
    from fxpress.passes.pipeline import Pipeline
    from fxpress.passes.rewire.fuse import FuseLoRA
    from fxpress.passes.rewire.strip import StripBranches

    check_writable(args.out, args.overwrite)
    if not _is_artifact(args.dir):
        raise RecipeError(f"{args.dir} is not an fxpress artifact folder (no manifest.json)")
    graph, manifest = _artifact_graph(args.dir)
    step = StripBranches(args.role, _names(args.names)) if action == "strip" else FuseLoRA(_names(args.names))
    if action == "strip":
        step.chosen(graph)  # unknown names and kept adapters fail before any work
    new, report = Pipeline([step], verify=False).run(graph)
    row = report.passes[0].details
    if action == "strip":
        what = f"stripped {', '.join(row['stripped']) or 'nothing'} (role {row['role']})"
    else:
        layers = row["layers"]
        low = [r for r in layers.values() if r["base"] == "low-bit"]
        what = f"fused {', '.join(row['fused']) or 'nothing'} into {len(layers)} layers"
        if low:
            kept = sum(r["change_kept"] for r in low) / len(low)
            what += (f"; {len(low)} low-bit layers requantized, worst fuse error "
                     f"{max(r['fuse_error'] for r in low):.3g}, {kept:.0%} of the LoRA's change kept on average")
            if kept < 0.5:
                what += (" (the change is small against the low-bit grid: keep the LoRA as a branch for its "
                         "full effect)")
    _save(new, manifest, args, console, what)
    return 0
