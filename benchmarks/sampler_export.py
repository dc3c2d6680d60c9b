"""Benchmark: the digits testbed UNet's 4-step CFG sampler unrolled into one ONNX / ExecuTorch file.

Run: .venv/bin/python benchmarks/sampler_export.py [--runs 20] [--threads 1] [--out FILE.md]
(default FILE: benchmarks/results/sampler_export.md)

The sampler is DDIM (eta 0) over the testbed's training schedule with trailing spacing
(999, 749, 499, 249 -> end), the testbed's final alpha (alphas_cumprod[0]) and clipped x0, CFG at the
testbed's scale, batch 1. For each format it writes the unrolled file and the single-network file (one
CFG call: batch 2), and times per image (median of --runs): the torch Python loop, the unrolled file in
its runtime, and a Python loop calling the single-network file in the same runtime (DDIM arithmetic in
torch between calls). Differences are max |x - x_torch| of the images against the torch loop. Every
runtime gets --threads threads (default 1: on a shared 2-core machine, 2-thread torch ran 100x slower
than 1-thread torch, its threads waiting on each other).
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FXPRESS_QUIET", "1")

import torch  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402

from fxpress.frontends.sampler_capture import UnrolledSampler, sample_loop  # noqa: E402
from fxpress.ir.sampler import SamplerSpec, ddim_step  # noqa: E402
from fxpress.testbed import digits  # noqa: E402
from fxpress.testbed.models import load_testbed  # noqa: E402
from fxpress.testbed.sampling import training_scheduler  # noqa: E402

STEPS = 4


def median_ms(run, runs: int) -> float:
    """Median wall time of `runs` calls of `run` in ms, after two warm-up calls."""
    run()
    run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def loop_over(network, spec: SamplerSpec, noise, cond, uncond) -> torch.Tensor:
    """The sampler as a Python loop calling `network(sample, timestep, hidden) -> prediction` once per step."""
    x, both = noise, torch.cat([uncond, cond])
    for t, prev in zip(spec.timesteps, spec.prev_timesteps):
        out = network(torch.cat([x, x]), torch.full((2,), t, dtype=torch.long), both)
        u, c = out.chunk(2)
        x = ddim_step(spec, x, u + spec.guidance_scale * (c - u), spec.alpha(t), spec.alpha(prev))
    return x.clamp(-spec.clip_sample, spec.clip_sample)


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    from fxpress.backends.onnx import ORT_EXACT

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    for key, value in ORT_EXACT.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def weight_bytes(path: Path) -> int:
    """Bytes of weights in an .onnx (initializers) or .pte (named data) file."""
    if path.suffix == ".onnx":
        import onnx
        return sum(len(t.raw_data) or t.ByteSize() for t in onnx.load(str(path)).graph.initializer)
    from executorch.exir._serialize._program import deserialize_pte_binary
    named = deserialize_pte_binary(path.read_bytes()).named_data
    return sum(len(b) for b in named.buffers) if named is not None else 0


def measure(fmt: str, denoiser, spec, inputs, reference, runs: int, threads: int, tmp: Path,
            unfolded: bool = False) -> dict:
    """Export the unrolled and the single-network file in `fmt`; return sizes, differences and times."""
    noise, cond, uncond = inputs
    single_inputs = {"sample": torch.cat([noise, noise]), "timestep": torch.full((2,), spec.timesteps[0]),
                     "encoder_hidden_states": torch.cat([uncond, cond])}
    sampler = UnrolledSampler(denoiser, spec).eval()
    start = time.perf_counter()
    if fmt == "onnx":
        from fxpress.backends.onnx import export_onnx
        unrolled = export_onnx(sampler, inputs, tmp / "sampler.onnx", node_names=False, fold=True)  # as the CLI
        seconds = time.perf_counter() - start
        plain = export_onnx(sampler, inputs, tmp / "plain.onnx", node_names=False).file_bytes if unfolded else None
        single = export_onnx(denoiser, single_inputs, tmp / "unet.onnx")
        bare = export_onnx(denoiser, single_inputs, tmp / "unet-bare.onnx", node_names=False).file_bytes
        session, network = ort_session(unrolled.path, threads), ort_session(single.path, threads)
        feed = {"noise": noise.numpy(), "cond": cond.numpy(), "uncond": uncond.numpy()}

        def run_unrolled():
            return torch.from_numpy(session.run(None, feed)[0])

        def call(sample, timestep, hidden):
            return torch.from_numpy(network.run(None, {"sample": sample.numpy(), "timestep": timestep.numpy(),
                                                       "encoder_hidden_states": hidden.numpy()})[0])
    else:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        from fxpress.backends.executorch import export_executorch
        unrolled = export_executorch(sampler, inputs, tmp / "sampler.pte", weights="float", fold=True)
        seconds = time.perf_counter() - start
        plain = export_executorch(sampler, inputs, tmp / "plain.pte", weights="float").file_bytes if unfolded else None
        single = export_executorch(denoiser, single_inputs, tmp / "unet.pte", weights="float")
        bare = single.file_bytes
        _unsafe_reset_threadpool(threads)   # XNNPACK's threadpool (the runtime's only thread setting)
        runtime = Runtime.get()
        method = runtime.load_program(unrolled.path).load_method("forward")
        network = runtime.load_program(single.path).load_method("forward")

        def run_unrolled():
            return method.execute(list(inputs))[0]

        def call(sample, timestep, hidden):
            return network.execute([sample, timestep, hidden])[0]

    def run_loop():
        return loop_over(call, spec, noise, cond, uncond)

    return {"file": unrolled.file_bytes, "single": single.file_bytes, "bare": bare, "export_s": seconds, "plain": plain,
            "weights": weight_bytes(unrolled.path), "single_weights": weight_bytes(single.path),
            "diff": float((run_unrolled() - reference).abs().max()),
            "loop_diff": float((run_loop() - reference).abs().max()),
            "unrolled_ms": median_ms(run_unrolled, runs), "loop_ms": median_ms(run_loop, runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="threads of every runtime (torch, ORT, XNNPACK)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampler_export.md"))
    parser.add_argument("--unfolded", action="store_true",
                        help="also export each unrolled file without folding the timestep-only values (size only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    testbed = load_testbed("digits")
    denoiser = testbed.denoiser
    scheduler = DDIMScheduler.from_config(training_scheduler().config, timestep_spacing="trailing",
                                          set_alpha_to_one=False)
    spec = SamplerSpec.from_scheduler(scheduler, STEPS, guidance_scale=testbed.spec.guidance)
    noise = torch.randn(1, 1, digits.SIZE, digits.SIZE, generator=torch.Generator().manual_seed(0))
    inputs = (noise, testbed.encode([digits.caption(7)]), testbed.encode([""]))
    with torch.no_grad():
        reference = sample_loop(denoiser, spec, *inputs)
        torch_ms = median_ms(lambda: sample_loop(denoiser, spec, *inputs), args.runs)
        results = {}
        for fmt in ("onnx", "executorch"):
            with tempfile.TemporaryDirectory() as tmp:
                results[fmt] = measure(fmt, denoiser, spec, inputs, reference, args.runs, args.threads, Path(tmp),
                                       args.unfolded)
            print(fmt, results[fmt], flush=True)
    params = sum(p.numel() for p in denoiser.parameters())
    names = {"onnx": ("ONNX", "ONNX Runtime (ORT_EXACT)"), "executorch": (".pte (XNNPACK, fp32)", "ExecuTorch runtime")}
    lines = [
        "# The digits UNet's 4-step CFG sampler as one file (ONNX, ExecuTorch)", "",
        f"Produced by `.venv/bin/python benchmarks/sampler_export.py --runs {args.runs} --threads {args.threads}"
        f"{' --unfolded' if args.unfolded else ''}` on "
        f"{datetime.date.today()} ({platform.machine()}, {os.cpu_count()} cores shared with other jobs, no GPU; "
        f"torch {torch.__version__}).", "",
        f"Denoiser: the trained digits testbed UNet ({params / 1e6:.2f} M params, 1x16x16, fp32). Sampler: DDIM "
        f"(eta 0), trailing timesteps {list(spec.timesteps)}, final alpha alphas_cumprod[0], x0 clipped to [-1, 1], "
        f"CFG scale {spec.guidance_scale} (2 network calls per step in one batch), batch 1, output clamped to "
        "[-1, 1]. Differences: max |x - x_torch| over the image against the torch Python loop "
        "(`sample_loop`). Times: CPU wall time per image, median of "
        f"{args.runs} runs after 2 warm-ups, {args.threads} thread(s) in every runtime; \"loop over one network\" "
        "calls the single-network file once per step from Python in the same runtime, with the DDIM arithmetic in "
        "torch. Weights in the file: ONNX initializers; the .pte's named data (XNNPACK constants, by content "
        "hash).", "",
        "The unrolled ONNX file leaves out each node's module path (`export_onnx(node_names=False)`, what "
        "`fxpress export --sampler` writes): half of its graph bytes would repeat one network's names per step. "
        "\"Ratio\" divides by the single-network file as `fxpress export` writes it; \"like for like\" by the "
        "single network exported the same way.", "",
        "The unrolled files are folded, as `fxpress export --sampler` writes them (`ir.constant_fold`). The "
        "sampler calls the denoiser at four fixed timesteps, so everything computed from the timestep alone is "
        "computed once at export: the sinusoidal embedding, the time MLP and each block's time projection. "
        "It is stored as small per-step constants, and the weights that only fed it leave the file. That is "
        "why \"weights in the unrolled file\" is below the single network's. \"Unfolded\" is the same export "
        "without folding" + (", measured in this run." if args.unfolded else " (not measured in this run: "
                                                                         "--unfolded)."), "",
        "| format | unrolled file | single-network file | ratio | like for like | unfolded (ratio) | "
        "weights in unrolled / single file | max diff (unrolled) | max diff (loop over one network) | "
        "export (unrolled) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fmt, r in results.items():
        lines.append(f"| {names[fmt][0]} | {r['file'] / 1e6:.2f} MB | {r['single'] / 1e6:.2f} MB | "
                     f"{r['file'] / r['single']:.3f}x | {r['file'] / r['bare']:.3f}x | "
                     + (f"{r['plain'] / 1e6:.2f} MB ({r['plain'] / r['single']:.3f}x) | " if r["plain"] else "- | ") +
                     f"{r['weights'] / 1e6:.3f} / {r['single_weights'] / 1e6:.3f} MB | "
                     f"{r['diff']:.1e} | {r['loop_diff']:.1e} | "
                     f"{r['export_s']:.0f} s |")
    lines += ["", "| runtime | what runs | ms per image |", "|---|---|---|",
              f"| torch (eager) | Python loop (`sample_loop`) | {torch_ms:.1f} |"]
    for fmt, r in results.items():
        lines += [f"| {names[fmt][1]} | unrolled file, one call | {r['unrolled_ms']:.1f} |",
                  f"| {names[fmt][1]} | Python loop over the single-network file | {r['loop_ms']:.1f} |"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
