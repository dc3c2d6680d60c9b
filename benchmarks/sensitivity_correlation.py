"""Benchmark: local vs end-to-end sensitivity on tiny-unet, their rank correlation, and their cost.

Run: .venv/bin/python benchmarks/sensitivity_correlation.py [--calibration 4]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("FXPRESS_QUIET", "1")

import fxpress  # noqa: E402
from fxpress.frontends import zoo  # noqa: E402
from fxpress.frontends.calibration import spread_timesteps  # noqa: E402
from fxpress.passes.quant.select_layers import SelectLayers  # noqa: E402
from fxpress.passes.quant.time_cache import CacheTimeEmbedding  # noqa: E402
from fxpress.passes.sensitivity import MeasureSensitivity, rank_correlation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-unet")
    parser.add_argument("--calibration", type=int, default=4)
    args = parser.parse_args()
    entry = zoo.get(args.model)
    example = entry.example_inputs()
    graph = fxpress.capture(entry.build(), example.args, example.kwargs)
    graph.calibration = spread_timesteps(graph.example, "timestep", args.calibration)
    graph, _ = fxpress.Pipeline([CacheTimeEmbedding(), SelectLayers()]).run(graph)
    seconds = {}
    for mode in ("local", "hybrid", "e2e"):
        start = time.perf_counter()
        graph, _ = fxpress.Pipeline([MeasureSensitivity(mode)]).run(graph)
        seconds[mode] = time.perf_counter() - start
    rho = {m: rank_correlation(graph, m, "e2e") for m in ("local", "hybrid")}
    per_option = {}
    for key in ("b1", "b2", "b3", "b4"):
        sub = graph.copy()
        for ann in sub.annotations().values():
            for s in ann.sensitivity.values():
                s.error = {k: v for k, v in s.error.items() if k == key}
        per_option[key] = rank_correlation(sub)
    layers = sum(1 for a in graph.annotations().values() if not a.keep_reason)
    print(f"\n{args.model}: {layers} layers x 8 grids, {args.calibration} calibration inputs over timesteps\n")
    print("| mode | seconds |\n|---|---|")
    for mode, s in seconds.items():
        print(f"| {mode} | {s:.1f} |")
    print("\nSpearman rank correlation with e2e over all (layer, grid) pairs: "
          + ", ".join(f"{m} {v:.3f}" for m, v in rho.items()))
    print("local vs e2e per grid (ranking layers): " + ", ".join(f"{k} {v:.3f}" for k, v in per_option.items()))


if __name__ == "__main__":
    main()
