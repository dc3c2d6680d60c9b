"""Benchmark: compress the SD-1.5 UNet at 1.99 bits; print wall time, peak memory, artifact size, load time.

Run: .venv/bin/python benchmarks/compress_sd15.py [--out DIR] [--target-bits 1.99]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sd15-unet")
    parser.add_argument("--out", default="/tmp/fxpress-sd15")
    parser.add_argument("--target-bits", default="1.99")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    cmd = [sys.executable, "-m", "fxpress.cli", "compress", args.model, "--recipe", "bitsfusion",
           "--target-bits", args.target_bits, "--out", args.out]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    files = {p.name: p.stat().st_size for p in Path(args.out).iterdir()}
    load_cmd = [sys.executable, "-c", (
        f"import time, fxpress; t = time.perf_counter(); m = fxpress.load({args.out!r}); "
        "print(f'load {time.perf_counter() - t:.1f} s (decode {m.fxpress_load_seconds[\"decode\"]:.1f} s)')")]
    load_out = subprocess.run(load_cmd, check=True, capture_output=True, text=True).stdout.strip()
    print("\n| model | target bits | wall time | peak RSS | artifact | load |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.model} | {args.target_bits} | {wall:.0f} s | {peak_gb:.1f} GB | "
          f"{sum(files.values()) / 1e6:.1f} MB | {load_out} |")
    for name, size in sorted(files.items()):
        print(f"  {name}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
