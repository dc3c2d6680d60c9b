"""`fxpress export`: lower an artifact to ONNX, ExecuTorch or Core ML and print what each layer became."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fxpress.errors import LoweringError

FORMATS = ("onnx", "executorch", "coreml")


def add_export_parser(sub, console: Console) -> None:
    """Register the `export` subcommand on an argparse subparsers object; it prints to `console`."""
    e = sub.add_parser("export", help="export an artifact to a deployment runtime's format")
    e.add_argument("artifact", help="fxpress artifact directory")
    e.add_argument("--to", choices=FORMATS, default="onnx", help="target format")
    e.add_argument("--out", required=True, help="file (.onnx, .pte) or package (.mlpackage) to write")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--no-int2", action="store_true", help="onnx: stay at opset 21 (INT4 at the narrowest)")
    e.add_argument("--weights", choices=("lowbit", "float"), default="lowbit",
                   help="executorch: XNNPACK int4/int8 weights with int8 activations, or exact fp32")
    e.add_argument("--precision", choices=("float16", "float32"), default="float16",
                   help="coreml: the ML program's compute precision")
    e.add_argument("--check", action="store_true",
                   help="run the result in its runtime (ONNX Runtime, ExecuTorch) or read it back (Core ML) "
                        "and compare with the torch backend")
    e.set_defaults(func=lambda args: run_export(args, console))


def _write(fmt: str, model, inputs, out: Path, args: argparse.Namespace):
    if fmt == "onnx":
        from fxpress.backends.onnx import export_onnx
        return export_onnx(model, inputs, out, int2=not args.no_int2)
    if fmt == "executorch":
        from fxpress.backends.executorch import export_executorch
        return export_executorch(model, inputs, out, weights=args.weights)
    from fxpress.backends.coreml import export_coreml
    return export_coreml(model, inputs, out, precision=args.precision)


def _check(fmt: str, model, inputs, report, console: Console) -> None:
    if fmt == "onnx":
        from fxpress.backends.onnx import ORT_EXACT, compare_with_onnxruntime
        errors = compare_with_onnxruntime(model, inputs, report.path)
        settings = ", ".join(f"{k}={v}" for k, v in ORT_EXACT.items())
        console.print(f"ONNX Runtime vs torch backend, rel. error: exact settings ({settings}) "
                      f"{errors['exact']:.2e}; default settings {errors['default']:.2e}")
    elif fmt == "executorch":
        from fxpress.backends.executorch import compare_with_executorch
        console.print(f"ExecuTorch runtime vs torch backend, rel. error: "
                      f"{compare_with_executorch(model, inputs, report.path):.2e}")
    else:
        from fxpress.backends.coreml import read_palettization
        widths = read_palettization(report.path)
        wrong = [f"{layer.module}: {widths.get(layer.module)} bits" for layer in report.layers
                 if layer.stored_as.startswith("LUT") and f"uint{widths.get(layer.module)} " not in layer.stored_as]
        if wrong:
            raise LoweringError(f"{report.path}: read back with other widths than planned: {wrong[:5]}")
        console.print(f"read back {len(widths)} palettized weights at their planned widths; largest weight "
                      f"error {report.max_weight_error:.1e} of the layer's range (predictions need macOS)")


def run_export(args: argparse.Namespace, console: Console) -> int:
    """Export an artifact as `args` say and print the per-layer table; raises LoweringError on failure."""
    from fxpress.backends.torch_load import load
    from fxpress.ir.artifact import artifact_bytes, read_manifest
    from fxpress.ir.input_spec import inputs_from_spec

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise LoweringError(f"{out} exists; pass --overwrite to replace it")
    spec = read_manifest(args.artifact).get("inputs")
    if not spec:
        raise LoweringError(f"{args.artifact} records no example inputs (saved by an older fxpress); "
                            "save it again to export it")
    inputs = inputs_from_spec(spec)
    start = time.perf_counter()
    with console.status(f"loading {args.artifact}"):
        model = load(args.artifact)
    with console.status(f"exporting to {args.to} (capture, convert, write)"):
        report = _write(args.to, model, inputs, out, args)
    table = Table(title=f"{out}: what each low-bit layer became")
    for col in ("layer", "kind", "code bits", "stored as", "bytes", "why not low-bit"):
        table.add_column(col, justify="left" if col in ("layer", "why not low-bit") else "right")
    for layer in report.layers:
        table.add_row(layer.module, layer.kind, str(layer.width), layer.stored_as, f"{layer.bytes:,}",
                      getattr(layer, "reason", ""))
    console.print(table)
    size = getattr(report, "file_bytes", None) or getattr(report, "package_bytes", 0)
    artifact = artifact_bytes(args.artifact)
    console.print(f"{out}: {size / 1e6:,.2f} MB, {size / artifact:.2f}x the fxpress artifact "
                  f"({artifact / 1e6:,.2f} MB); {time.perf_counter() - start:.1f} s")
    if args.check:
        with console.status(f"checking {out}"):
            _check(args.to, model, inputs, report, console)
    return 0
