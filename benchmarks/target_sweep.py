"""Bit targets are budgets: sweep every target from the narrowest option's cost to 8.0 in 0.1 steps on
tiny-unet and dit-s, and compress models outside the zoo at 8, 4 and 2 bits from their own
save_pretrained folders, saved into an existing empty folder and loaded back.

    .venv/bin/python benchmarks/target_sweep.py [--out benchmarks/results/target_sweep.md] [--models tiny-unet,dit-s]

The sweep measures sensitivity once per model (the recipe's first passes) and then runs the recipe's
remaining passes (allocate, quantize, round to storage) for each target; every fourth target of dit-s
and every target of tiny-unet is saved and loaded back.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("FXPRESS_QUIET", "1")
import fxpress  # noqa: E402
from fxpress.frontends import zoo  # noqa: E402
from fxpress.frontends.calibration import spread_timesteps  # noqa: E402
from fxpress.frontends.model_sources import resolve_model  # noqa: E402
from fxpress.ir.graph import Inputs, output_tensors  # noqa: E402
from fxpress.passes.quant.allocate_bits import weights_only_bits  # noqa: E402
from fxpress.passes.quant.select_layers import SPECIAL, resolve_keep  # noqa: E402

LINES: list[str] = []


def emit(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def _rel(a, b) -> float:
    a, b = output_tensors(a)[0].float(), output_tensors(b)[0].float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _round_trip(result, example: Inputs) -> float:
    """Save into an existing empty folder, load, and return the loaded model's output difference."""
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        fxpress.save(result, folder, plot=False)
        loaded = fxpress.load(folder)
        return _rel(loaded(*example.args, **example.kwargs), result.graph.run(example))


def sweep(name: str, save_every: int) -> list[tuple[float, float, float, float | None]]:
    """Return (target, achieved, seconds, round-trip difference or None) for every target on zoo model `name`."""
    entry = zoo.get(name)
    model, example = entry.build(), Inputs.of(entry.example_inputs())
    recipe = fxpress.make_recipe("bitsfusion")
    passes = recipe.passes()
    measure, per_target = passes[:3], passes[3:]
    start = time.perf_counter()
    graph = fxpress.capture(model, example.args, example.kwargs)
    graph.calibration = spread_timesteps(example, "timestep", recipe.calibration)
    resolve_keep(graph, [k for k in recipe.keep if k not in SPECIAL])
    measured, _ = fxpress.Pipeline(measure).run(graph)
    emit(f"\n{name}: {sum(p.numel() for p in model.parameters()):,} params; sensitivity measured once in "
         f"{time.perf_counter() - start:.0f} s")
    rows = []
    targets = [*np.round(np.arange(1.585, 8.0, 0.1), 3).tolist(), 8.0]
    for i, target in enumerate(targets):
        start = time.perf_counter()
        allocate = type(per_target[0])(target, None, recipe.options(), recipe.eta, recipe.sensitivity,
                                       recipe.scale_init)
        out, report = fxpress.Pipeline([allocate, *per_target[1:]]).run(measured)
        achieved = weights_only_bits(out)
        seconds = time.perf_counter() - start
        diff = None
        if i % save_every == 0 or target in (2.0, 4.0, 8.0):
            result = fxpress.CompressResult(out, fxpress.make_recipe("bitsfusion", target_bits=target), report,
                                            {"weights_only_bits": achieved})
            diff = _round_trip(result, example)
        assert achieved <= target + 1e-9, (name, target, achieved)
        rows.append((target, achieved, seconds, diff))
        print(f"  {name} target {target:.3f}: achieved {achieved:.4f} in {seconds:.1f} s"
              + ("" if diff is None else f", saved + loaded (difference {diff:.1e})"), flush=True)
    return rows


OUTSIDE = {
    "AutoencoderKL (VAE)": ("diffusers", "AutoencoderKL", dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=32)),
    "T5EncoderModel": ("transformers", "T5EncoderModel", dict(
        vocab_size=256, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16)),
    "PixArtTransformer2DModel (DiT)": ("diffusers", "PixArtTransformer2DModel", dict(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=16,
        patch_size=2, cross_attention_dim=64, caption_channels=32)),
    "SD3Transformer2DModel (MMDiT)": ("diffusers", "SD3Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16)),
    "UNet2DModel (unconditional)": ("diffusers", "UNet2DModel", dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8)),
    "CLIPVisionModel": ("transformers", "CLIPVisionModel", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8)),
}


def _build(library: str, cls_name: str, config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    if library == "diffusers":
        import diffusers
        return getattr(diffusers, cls_name)(**config)
    import transformers
    cls = getattr(transformers, cls_name)
    return cls(cls.config_class(**config))


def outside_zoo(root: Path) -> list[tuple[str, int, float, float, float, float]]:
    """Return (model, params, target, achieved, output error, round-trip difference) for 8, 4 and 2 bits."""
    rows = []
    for label, (library, cls_name, config) in OUTSIDE.items():
        folder = root / cls_name
        _build(library, cls_name, config).save_pretrained(folder)
        source = resolve_model(str(folder))  # the user's path: a save_pretrained folder
        model, example = source.build(), Inputs.of(source.example_inputs())
        params = sum(p.numel() for p in model.parameters())
        for target in (8.0, 4.0, 2.0):
            result = fxpress.compress(model, example, "bitsfusion", target_bits=target)
            rows.append((label, params, target, result.summary["weights_only_bits"],
                         result.summary["output_rel_error"], _round_trip(result, example)))
            print(f"  {label} at {target}: achieved {rows[-1][3]:.4f}, output rel. error {rows[-1][4]:.3g}, "
                  f"round trip {rows[-1][5]:.1e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny-unet,dit-s")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "target_sweep.md"))
    parser.add_argument("--skip-outside", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    began = time.perf_counter()
    emit("# Bit targets are budgets: the sweep and models outside the zoo\n")
    emit(f"torch {torch.__version__}, {os.cpu_count()} CPU cores; `python benchmarks/target_sweep.py`. "
         "Default BitsFusion recipe (widths 1, 2, 3, 4, 8; balanced and plain grids; local sensitivity).")
    sweeps = {name: sweep(name, 1 if name == "tiny-unet" else 4) for name in args.models.split(",")}
    emit("\n## Every target from 1.585 to 8.0 in 0.1 steps\n")
    names = list(sweeps)
    emit("| target | " + " | ".join(f"{n} achieved" for n in names) + " |")
    emit("|---|" + "---|" * len(names))
    for i, (target, *_rest) in enumerate(sweeps[names[0]]):
        emit(f"| {target:.3f} | " + " | ".join(f"{sweeps[n][i][1]:.4f}" for n in names) + " |")
    for n in names:
        rows = sweeps[n]
        unspent = [t - a for t, a, _, _ in rows]
        trips = [d for *_, d in rows if d is not None]
        emit(f"\n{n}: {len(rows)} targets, 0 errors, achieved <= target in all; unspent bits per weight "
             f"mean {np.mean(unspent):.4f}, max {max(unspent):.4f}; {len(trips)} saved and loaded back, largest "
             f"output difference after loading {max(trips):.1e}; {np.mean([s for _, _, s, _ in rows]):.1f} s "
             "per target (allocate + quantize + round)")
    if not args.skip_outside:
        emit("\n## Models outside the zoo, from their own save_pretrained folders, at 8, 4 and 2 bits\n")
        with tempfile.TemporaryDirectory() as root:
            rows = outside_zoo(Path(root))
        emit("\n| model | params | target | achieved | output rel. error | saved + loaded, output difference |")
        emit("|---|---|---|---|---|---|")
        for label, params, target, achieved, error, trip in rows:
            emit(f"| {label} | {params:,} | {target:.0f} | {achieved:.4f} | {error:.3g} | {trip:.1e} |")
    emit(f"\nTotal {time.perf_counter() - began:.0f} s.")
    Path(args.out).write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
