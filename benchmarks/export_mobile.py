"""Benchmark: export fxpress artifacts to ExecuTorch (XNNPACK) and Core ML; print sizes against the artifact.

Run: .venv/bin/python benchmarks/export_mobile.py [--formats executorch,coreml] ZOO_NAME=ARTIFACT_DIR [...]
(e.g. tiny-unet=artifacts/tiny-unet). Inputs come from the zoo entry. ExecuTorch is exported twice:
"lowbit" (XNNPACK int4/int8 weights, int8 dynamic activations) and "float" (dequantized fp32), each
run in ExecuTorch's runtime against the torch backend. Core ML is converted, palettized and read back
(its predictions need macOS).
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FXPRESS_QUIET", "1")

import fxpress  # noqa: E402
from fxpress.frontends import zoo  # noqa: E402
from fxpress.ir.artifact import artifact_bytes  # noqa: E402


def executorch_rows(name: str, model, example, art: int) -> list[str]:
    """One table row per ExecuTorch weight mode."""
    from fxpress.backends.executorch import WEIGHT_MODES, compare_with_executorch, export_executorch

    rows = []
    for weights in WEIGHT_MODES:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = export_executorch(model, example, Path(tmp) / f"{name}.pte", weights=weights)
            seconds = time.perf_counter() - start
            error = compare_with_executorch(model, example, report.path)
        types = collections.Counter(layer.stored_as for layer in report.layers)
        rows.append(f"| {name} | ExecuTorch {weights} | {art / 1e6:.2f} MB | {report.file_bytes / 1e6:.2f} MB | "
                    f"{report.file_bytes / art:.2f}x | {dict(sorted(types.items()))} | "
                    f"{report.delegated_calls} XNNPACK calls, {len(report.portable_ops)} portable op kinds | "
                    f"rel. err {error:.1e} | {seconds:.0f} s |")
        print(rows[-1], flush=True)
    return rows


def coreml_rows(name: str, model, example, art: int) -> list[str]:
    """One table row for the palettized Core ML package, with its widths read back."""
    from fxpress.backends.coreml import export_coreml, palette_bits, read_palettization

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = export_coreml(model, example, Path(tmp) / f"{name}.mlpackage")
        seconds = time.perf_counter() - start
        read_back = read_palettization(report.path)
    planned = {layer.module: palette_bits(layer.width) for layer in report.layers if layer.stored_as.startswith("LUT")}
    widths = collections.Counter(read_back.values())
    row = (f"| {name} | Core ML fp16 | {art / 1e6:.2f} MB | {report.package_bytes / 1e6:.2f} MB | "
           f"{report.package_bytes / art:.2f}x | read back: {dict(sorted(widths.items()))} bits | "
           f"{'all' if read_back == planned else 'NOT all'} {len(planned)} layers at planned width | "
           f"max weight err {report.max_weight_error:.1e} | {seconds:.0f} s |")
    print(row, flush=True)
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="executorch,coreml")
    parser.add_argument("models", nargs="+", help="ZOO_NAME=ARTIFACT_DIR")
    args = parser.parse_args()
    rows = []
    for item in args.models:
        name, _, directory = item.partition("=")
        example = zoo.get(name).example_inputs()
        model = fxpress.load(directory)
        art = artifact_bytes(directory)
        if "executorch" in args.formats:
            rows += executorch_rows(name, model, example, art)
        if "coreml" in args.formats:
            rows += coreml_rows(name, model, example, art)
    print("\n| model | format | fxpress artifact | output | ratio | low-bit layers stored as | runtime | "
          "accuracy vs torch backend | export |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")


if __name__ == "__main__":
    main()
