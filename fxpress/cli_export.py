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
    e.add_argument("--sampler", action="store_true",
                   help="onnx, executorch: export the whole few-step sampler (every denoiser call, the guidance "
                        "and the DDIM arithmetic) as one program: (noise, cond[, uncond]) -> image; what depends "
                        "only on the fixed timesteps is precomputed")
    e.add_argument("--steps", type=int, default=None,
                   help="sampler: the step count (the artifact's recorded sampler fixes it)")
    e.add_argument("--guidance", type=float, default=None, help="sampler: the guidance scale (default: the spec's)")
    e.add_argument("--scheduler", default=None,
                   help="sampler: a diffusers scheduler folder or scheduler_config.json, for artifacts that record "
                        "no sampler (DDIM at --steps over its schedule)")
    e.set_defaults(func=lambda args: run_export(args, console))


def _write(fmt: str, model, inputs, out: Path, args: argparse.Namespace):
    if fmt == "onnx":
        from fxpress.backends.onnx import export_onnx
        return export_onnx(model, inputs, out, int2=not args.no_int2, node_names=not args.sampler,
                           fold=args.sampler)
    if fmt == "executorch":
        from fxpress.backends.executorch import export_executorch
        return export_executorch(model, inputs, out, weights=args.weights, fold=args.sampler)
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


SAMPLE_INPUTS = ("sample", "hidden_states")  # what the noisy sample is called: UNets, DiTs


def _scheduler_config(path: str) -> dict:
    """The JSON config of a diffusers scheduler folder or scheduler_config.json; raises LoweringError."""
    import json

    file = Path(path)
    file = file / "scheduler_config.json" if file.is_dir() else file
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoweringError(f"--scheduler {path}: cannot read a scheduler config from {file}: {exc}") from exc
    if not isinstance(config, dict) or "num_train_timesteps" not in config:
        raise LoweringError(f"--scheduler {path}: {file} is not a diffusers scheduler config (no num_train_timesteps)")
    return config


def sampler_spec(args: argparse.Namespace, manifest: dict, inputs):
    """The SamplerSpec to unroll: the artifact's recorded sampler, else DDIM at --steps over --scheduler's
    schedule; --guidance replaces the scale. Raises LoweringError saying what to pass."""
    import dataclasses
    import inspect

    from fxpress.errors import FxpressError
    from fxpress.ir.sampler import SamplerSpec

    if args.to not in ("onnx", "executorch"):
        raise LoweringError(f"--sampler exports to onnx or executorch, not {args.to}")
    if args.steps is not None and args.steps < 1:
        raise LoweringError(f"--steps must be at least 1, got {args.steps}")
    recorded = manifest.get("sampler")
    try:
        if recorded is not None:
            spec = SamplerSpec.from_json(recorded)
            if args.scheduler is not None:
                raise LoweringError(f"{args.artifact} records its sampler ({spec.steps} steps at timesteps "
                                    f"{list(spec.timesteps)}); leave --scheduler out")
            if args.steps is not None and args.steps != spec.steps:
                raise LoweringError(f"{args.artifact} supports only its recorded {spec.steps}-step sampler "
                                    f"(timesteps {list(spec.timesteps)}); pass --steps {spec.steps} or leave it out")
        elif args.scheduler is None or args.steps is None:
            raise LoweringError(f"{args.artifact} records no sampler; pass --scheduler PATH (a diffusers scheduler "
                                "folder or scheduler_config.json) and --steps N to unroll DDIM over its schedule")
        else:
            from diffusers import DDIMScheduler

            config = _scheduler_config(args.scheduler)
            known = inspect.signature(DDIMScheduler.__init__).parameters
            spec = SamplerSpec.from_scheduler(DDIMScheduler(**{k: v for k, v in config.items() if k in known}),
                                              args.steps)
            sample = next((n for n in SAMPLE_INPUTS if n in inputs.kwargs), spec.sample_input)
            spec = dataclasses.replace(spec, sample_input=sample)
        if args.guidance is not None:
            if spec.guidance == "none":
                raise LoweringError("--guidance: this sampler uses no guidance (guidance 'none')")
            spec = dataclasses.replace(spec, guidance_scale=args.guidance)
    except LoweringError:
        raise
    except (FxpressError, TypeError, ValueError) as exc:   # a bad recorded spec or scheduler config
        raise LoweringError(f"--sampler: cannot build the sampler of {args.artifact}: {exc}") from exc
    return spec


def sampler_example(spec, recorded):
    """Sampler inputs (noise, cond[, uncond][, guidance]) at batch 1, shaped like the recorded example's
    sample and condition inputs; raises LoweringError naming a missing input."""
    from fxpress.frontends.sampler_capture import sampler_call
    from fxpress.ir.graph import Inputs

    named = {}
    for role, name in (("noise", spec.sample_input), ("cond", spec.condition_input)):
        value = recorded.kwargs.get(name)
        if value is None:
            raise LoweringError(f"--sampler: the artifact's example inputs have no {name!r} (the sampler's {role}); "
                                f"they are {', '.join(recorded.kwargs) or 'positional'}")
        named[role] = value[:1]
    if spec.guidance == "cfg":   # the recorded example's second condition row, else zeros
        second = recorded.kwargs[spec.condition_input][1:2]
        named["uncond"] = second if len(second) else named["cond"] * 0
    return Inputs(*sampler_call(named))


def median_seconds(run, repeats: int = 3) -> float:
    """The median wall time of `repeats` calls of `run` (warm it up first)."""
    import statistics

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_sampler(fmt: str, denoiser, spec, inputs, path: Path, console: Console) -> None:
    """Run the exported sampler in its runtime (ONNX Runtime with ORT_EXACT, ExecuTorch) and the Python loop
    in torch on `inputs`; print the largest difference and each one's CPU time per image (median of 3)."""
    import numpy as np
    import torch

    from fxpress.frontends.sampler_capture import INPUT_NAMES, sample_loop

    named = {**dict(zip(INPUT_NAMES, inputs.args)), **inputs.kwargs}
    with torch.no_grad():
        reference = sample_loop(denoiser, spec, **named)
    if fmt == "onnx":
        import onnxruntime as ort

        from fxpress.backends.onnx import ORT_EXACT
        options = ort.SessionOptions()
        for key, value in ORT_EXACT.items():
            options.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {i.name: named[i.name].numpy() for i in session.get_inputs()}
        def run():
            return torch.from_numpy(np.asarray(session.run(None, feed)[0]))
        runtime = "ONNX Runtime (" + ", ".join(f"{k}={v}" for k, v in ORT_EXACT.items()) + ")"
    else:
        from executorch.runtime import Runtime
        method = Runtime.get().load_program(Path(path)).load_method("forward")
        flat = [*inputs.args, *inputs.kwargs.values()]
        def run():
            return method.execute(flat)[0]
        runtime = "ExecuTorch runtime"
    diff = float((run().float() - reference).abs().max())   # these first runs warm both up
    with torch.no_grad():
        loop_s = median_seconds(lambda: sample_loop(denoiser, spec, **named))
    file_s = median_seconds(run)
    console.print(f"{runtime} vs the Python loop in torch ({spec.steps} steps, guidance {spec.guidance}): "
                  f"max abs difference {diff:.2e}")
    console.print(f"CPU time per image (batch 1, median of 3): {path.name} in {runtime.split(' (')[0]} "
                  f"{file_s * 1e3:,.1f} ms; torch Python loop {loop_s * 1e3:,.1f} ms")


def run_export(args: argparse.Namespace, console: Console) -> int:
    """Export an artifact as `args` say and print the per-layer table; raises LoweringError on failure."""
    from fxpress.backends.torch_load import load
    from fxpress.ir.artifact import artifact_bytes, read_manifest
    from fxpress.ir.input_spec import inputs_from_spec

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise LoweringError(f"{out} exists; pass --overwrite to replace it")
    manifest = read_manifest(args.artifact)
    spec = manifest.get("inputs")
    if not spec:
        raise LoweringError(f"{args.artifact} records no example inputs (saved by an older fxpress); "
                            "save it again to export it")
    inputs = inputs_from_spec(spec)
    sampler = None
    if args.sampler:
        sampler = sampler_spec(args, manifest, inputs)
        inputs = sampler_example(sampler, inputs)
    elif any(v is not None for v in (args.steps, args.guidance, args.scheduler)):
        raise LoweringError("--steps, --guidance and --scheduler apply to --sampler exports; add --sampler")
    start = time.perf_counter()
    with console.status(f"loading {args.artifact}"):
        model = load(args.artifact)
    if sampler is not None:
        from fxpress.frontends.sampler_capture import UnrolledSampler
        denoiser, model = model, UnrolledSampler(model, sampler).eval()
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
    if args.check and sampler is not None:
        with console.status(f"checking {out} against the Python loop"):
            check_sampler(args.to, denoiser, sampler, inputs, report.path, console)
    elif args.check:
        with console.status(f"checking {out}"):
            _check(args.to, model, inputs, report, console)
    return 0
