"""Benchmark: LoRA insertion, strip and fuse on the zoo, and LoRA fused into a 1.99-bit SD-1.5-config UNet.

Run: .venv/bin/python benchmarks/rewire.py [--models tiny-unet,dit-s,clip-text,sd15-unet] [--fuse-model sd15-unet]
     [--rank 8] [--delta 0.05] [--out FILE.md]        (default FILE: benchmarks/results/rewire.md)

Part 1, per model: capture, insert LoRA (rank --rank) on every attention projection and every conv, and
check the output at B = 0 is bit-identical (torch.equal, and the Pipeline's verify). Then give every B
random values, set the branch scale to 0 and check the output equals the base again, strip and check the
same. Part 2: compress --fuse-model with the BitsFusion recipe at 1.99 bits. Insert LoRA on the attention
projections and the resnet convs and set each layer's change B·A to --delta of its weight's norm. Fuse
it, and compare each low-bit layer's fuse error (relative Frobenius error of the requantized weight
against the float merge) with the error its original quantization made (the artifact's `weight_error`),
by width. The artifact sizes before and after are compared too.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FXPRESS_QUIET", "1")

import torch  # noqa: E402

import fxpress  # noqa: E402
from fxpress.frontends import zoo  # noqa: E402
from fxpress.frontends.capture import capture  # noqa: E402
from fxpress.ir.artifact import artifact_bytes  # noqa: E402
from fxpress.passes.pipeline import Pipeline  # noqa: E402
from fxpress.passes.rewire.branches import registry, set_branch_scale  # noqa: E402
from fxpress.passes.rewire.fuse import FuseLoRA  # noqa: E402
from fxpress.passes.rewire.lora import InsertLoRA  # noqa: E402
from fxpress.passes.rewire.strip import StripBranches  # noqa: E402

TARGETS = [r"(to_(q|k|v|out\.0)|(q|k|v|out)_proj)", "type:Conv2d"]
FUSE_TARGETS = [r"to_(q|k|v|out\.0)", r"resnets\.\d+\.conv[12]"]


def first(out):
    if isinstance(out, tuple):
        return out[0]
    for key in ("sample", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out


def randomize(graph, name: str, delta: float | None, seed: int = 0) -> None:
    """Give the branch's B factors values; with `delta`, scale each layer's change to delta x |W|."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path in registry(graph)[name]["targets"]:
            wrapper = graph.module.get_submodule(path)
            b = wrapper.lora_B.weight
            b.copy_(torch.randn(b.shape, generator=gen).to(b.dtype))
            if delta is not None:
                change = wrapper.delta_weight().norm()
                b.mul_(float(delta * wrapper.base_layer.weight.double().norm() / change.clamp_min(1e-30)))


def insertion_row(name: str, rank: int) -> dict:
    entry = zoo.get(name)
    model, example = entry.build(), entry.example_inputs()
    start = time.perf_counter()
    graph = capture(model, example.args, example.kwargs)
    with torch.no_grad():
        base = first(graph.run())
    targets = [t for t in TARGETS if t != "type:Conv2d" or any(isinstance(m, torch.nn.Conv2d) for m in model.modules())]
    rewired, report = Pipeline([InsertLoRA(targets, rank=rank, name="lora")], verify=True).run(graph)
    with torch.no_grad():
        identical = torch.equal(first(rewired.run()), base)
        randomize(rewired, "lora", None)
        changed = float((first(rewired.run()) - base).abs().max())
        set_branch_scale(rewired, "lora", 0.0)
        at_zero = torch.equal(first(rewired.run()), base)
        stripped, _ = Pipeline([StripBranches(role="adapter")]).run(rewired)
        strip_equal = torch.equal(first(stripped.run()), base)
    entry_ = registry(rewired)["lora"]
    return {"model": name, "layers": len(entry_["targets"]), "params": entry_["params"],
            "verify": report.passes[0].rel_error, "identical": identical, "changed": changed, "at_zero": at_zero,
            "strip": strip_equal, "seconds": time.perf_counter() - start}


def fuse_rows(name: str, rank: int, delta: float) -> dict:
    entry = zoo.get(name)
    model, example = entry.build(), entry.example_inputs()
    start = time.perf_counter()
    result = fxpress.compress(model, example, "bitsfusion", target_bits=1.99)
    compress_s = time.perf_counter() - start
    rewired, _ = Pipeline([InsertLoRA(FUSE_TARGETS, rank=rank, name="style")]).run(result.graph)
    randomize(rewired, "style", delta)
    start = time.perf_counter()
    fused, report = Pipeline([FuseLoRA()]).run(rewired)
    fuse_s = time.perf_counter() - start
    layers = report.passes[0].details["layers"]
    with tempfile.TemporaryDirectory() as tmp:
        base_bytes = artifact_bytes(fxpress.save(result.graph, Path(tmp) / "base")["path"])
        fused_bytes = artifact_bytes(fxpress.save(fused, Path(tmp) / "fused")["path"])
    with torch.no_grad():
        out_lora, out_fused = first(rewired.run()), first(fused.run())
    output_change = float((out_fused - out_lora).norm() / out_lora.norm())
    return {"model": name, "layers": layers, "base_bytes": base_bytes, "fused_bytes": fused_bytes,
            "compress_s": compress_s, "fuse_s": fuse_s, "output_change": output_change}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-unet,dit-s,clip-text,sd15-unet")
    parser.add_argument("--fuse-model", default="sd15-unet")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--delta", type=float, default=0.05, help="each LoRA layer's change as a fraction of |W|")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rewire.md"))
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        rows.append(insertion_row(name, args.rank))
        print(rows[-1], flush=True)
    fuse = fuse_rows(args.fuse_model, args.rank, args.delta)
    by_width = defaultdict(list)
    for row in fuse["layers"].values():
        if row["base"] == "low-bit":
            by_width[row["levels"]].append(row)
    lines = [
        "# Rewiring: LoRA insertion, scale, strip and fuse", "",
        f"Produced by `.venv/bin/python benchmarks/rewire.py --models {args.models} --fuse-model {args.fuse_model} "
        f"--rank {args.rank} --delta {args.delta}` on {datetime.date.today()} ({platform.machine()}, "
        f"{os.cpu_count()} cores, no GPU; torch {torch.__version__}).", "",
        "## Insertion is exact, scale 0 and strip give the base model back", "",
        f"LoRA rank {args.rank} on every attention projection (`to_q/k/v/out.0`, `q/k/v/out_proj`) and every "
        "Conv2d. \"B = 0\": output after insertion against the captured model (torch.equal; the Pipeline's "
        "verify gives the relative error). \"Trained\": max |change| once every B is random. \"Scale 0\" and "
        "\"strip\": torch.equal against the base output.", "",
        "| model | LoRA layers | LoRA params | B = 0 identical | verify rel. error | trained: max change | "
        "scale 0 identical | strip identical | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layers']} | {r['params']:,} | {'yes' if r['identical'] else 'NO'} | "
                     f"{r['verify']:.1e} | {r['changed']:.3g} | {'yes' if r['at_zero'] else 'NO'} | "
                     f"{'yes' if r['strip'] else 'NO'} | {r['seconds']:.0f} |")
    lines += [
        "", f"## LoRA fused into the 1.99-bit {args.fuse_model} artifact", "",
        f"BitsFusion at 1.99 bits ({fuse['compress_s']:.0f} s). LoRA rank {args.rank} on the attention projections "
        f"and resnet convs, each layer's change set to {args.delta:g} x its weight's norm. It is fused by "
        f"requantizing on each layer's own grid ({fuse['fuse_s']:.0f} s). \"Fuse error\": relative Frobenius "
        "error of the requantized weight against the float merge (dequantized base + change). \"Quantization "
        "error\": the error the layer's original quantization made (its `weight_error`). \"Change kept\": "
        "the realised weight change projected on the LoRA's, as a fraction of it. Per width (levels):", "",
        "| levels | layers | fuse error mean | fuse error max | quantization error mean | quantization error max | "
        "max ratio fuse / quantization | layers over 1 | change kept (mean) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for levels in sorted(by_width):
        group = by_width[levels]
        fe = [g["fuse_error"] for g in group]
        qe = [g["quantization_error"] for g in group]
        ratios = [f / q for f, q in zip(fe, qe)]
        lines.append(f"| {levels} | {len(group)} | {statistics.mean(fe):.4f} | {max(fe):.4f} | "
                     f"{statistics.mean(qe):.4f} | {max(qe):.4f} | {max(ratios):.3f} | {sum(r > 1 for r in ratios)} | "
                     f"{statistics.mean(g['change_kept'] for g in group):.3f} |")
    floats = sum(1 for r in fuse["layers"].values() if r["base"] == "float")
    lines += ["", f"Layers kept in float by the recipe and fused in float: {floats}. Artifact: "
              f"{fuse['base_bytes'] / 1e6:.2f} MB before, {fuse['fused_bytes'] / 1e6:.2f} MB after fusing "
              f"({(fuse['fused_bytes'] / fuse['base_bytes'] - 1) * 100:+.2f}%; both saved as Graphs). Output of the "
              f"fused model against the unfused LoRA model (relative L2): {fuse['output_change']:.4f}."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
