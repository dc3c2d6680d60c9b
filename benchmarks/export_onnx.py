"""Benchmark: export fxpress artifacts to ONNX; print file size against the artifact and ONNX Runtime's error.

Run: .venv/bin/python benchmarks/export_onnx.py ZOO_NAME=ARTIFACT_DIR [...]
(e.g. tiny-unet=artifacts/tiny-unet sd15-unet=/tmp/fxpress-sd15). Inputs come from the zoo entry.
"""

from __future__ import annotations

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
from fxpress.backends.onnx import compare_with_onnxruntime, export_onnx  # noqa: E402
from fxpress.frontends import zoo  # noqa: E402
from fxpress.ir.artifact import artifact_bytes  # noqa: E402


def main() -> None:
    rows = []
    for item in sys.argv[1:]:
        name, _, directory = item.partition("=")
        example = zoo.get(name).example_inputs()
        model = fxpress.load(directory)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = export_onnx(model, example, Path(tmp) / f"{name}.onnx")
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            errors = compare_with_onnxruntime(model, example, report.path)
            ort_seconds = time.perf_counter() - start
        types = collections.Counter(layer.stored_as for layer in report.layers)
        art = artifact_bytes(directory)
        rows.append(f"| {name} | {art / 1e6:.2f} MB | {report.file_bytes / 1e6:.2f} MB | "
                    f"{report.file_bytes / art:.2f}x | {report.opset} | {dict(sorted(types.items()))} | "
                    f"{errors['exact']:.1e} | {errors['default']:.1e} | {seconds:.0f} s | {ort_seconds:.0f} s |")
    print("\n| model | fxpress artifact | .onnx | ratio | opset | layers stored as | ORT exact rel. err "
          "| ORT default rel. err | export | ORT load + run (2 sessions) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")


if __name__ == "__main__":
    main()
