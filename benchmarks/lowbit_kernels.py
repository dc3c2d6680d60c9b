"""Benchmark: low-bit Triton kernels against fp16 cuBLAS/cuDNN, and a full SD-1.5 UNet forward (GPU only).

Prints markdown tables (and appends them to --out): the card's measured peaks; per linear shape
(K x N) and M, the time of fp16 cuBLAS, torch dequantize-then-matmul and fxpress at 1/2/3/4/8 bits
with the path the tuner chose, achieved bandwidth and TFLOP/s; the same for SD-1.5's convolutions;
the SD-1.5 UNet (64x64 latents) in fp16 against the 1.99-bit allocation and DiT-XL/2 against every
linear at 2 bits, at batch 1 and 2, lowered with each packed layout (k-major, output-major).

Kernel times are GPU times per call, replayed from a CUDA graph (so Python launch overhead is not
counted) that cycles through copies of the weights larger together than the L2 cache (so weights come
from DRAM, as in a real forward). Run: python benchmarks/lowbit_kernels.py [--sections linear,conv,unet,dit] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxpress.kernels import ops, triton_dispatch  # noqa: E402
from fxpress.kernels.packing import output_major, pack_words  # noqa: E402
from fxpress.kernels.tuning import TUNER, describe  # noqa: E402

# K x N: SD-1.5 attention and MLP, DiT-XL (hidden 1152, MLP 4608), a 4096-wide LLM layer and its MLP
LINEAR_SHAPES = [(320, 320), (640, 2560), (1280, 5120), (1152, 1152), (1152, 4608), (4608, 1152), (4096, 4096),
                 (4096, 11008)]
LAYOUT_WIDTHS = [2, 4]  # also timed with the output-major packed layout (packing.output_major)
MS = [1, 16, 256, 1024, 4096]
WIDTHS = [1, 2, 3, 4, 8]
# SD-1.5 convolutions at 64x64 latents, batch 2: (C, O, kernel, H, stride)
CONV_SHAPES = [(320, 320, 3, 64, 1), (640, 640, 3, 32, 1), (1280, 1280, 3, 16, 1), (1280, 1280, 3, 8, 1),
               (320, 640, 1, 32, 1), (640, 640, 3, 64, 2)]
CONV_WIDTHS = [2, 3, 4, 5]
OUT: Path | None = None


def emit(line: str = "") -> None:
    """Print a line and append it to the results file."""
    print(line, flush=True)
    if OUT is not None:
        with OUT.open("a") as f:
            f.write(line + "\n")


def graph_us(fn, arg_sets: list[tuple], calls: int = 0) -> float:
    """GPU time per fn(*args) in µs, from a CUDA graph of `calls` calls cycling through arg_sets.

    The first calls run outside the graph, so tuning and compiling are not timed.
    """
    for args in arg_sets[:2]:
        fn(*args)
    torch.cuda.synchronize()
    calls = calls or max(2 * len(arg_sets), 20)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*arg_sets[0])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(*arg_sets[i % len(arg_sets)])
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] / calls * 1e3


def cold_copies(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Copies of `tensor` that together hold three times the L2 cache (at least 2, at most 64)."""
    l2 = getattr(torch.cuda.get_device_properties(tensor.device), "L2_cache_size", 50 * 2**20)
    count = max(2, min(64, -(-3 * l2 // (tensor.numel() * tensor.element_size()))))
    return [tensor] + [tensor.clone() for _ in range(count - 1)]


@triton.jit
def _empty_kernel(p):
    tl.store(p, 0.0)


def measure_peaks() -> dict:
    """Measured copy bandwidth (bytes read + written), fp16 matmul rate and empty-kernel time of this card."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    copy_us = graph_us(torch.Tensor.copy_, [(torch.empty_like(a), a)])
    x = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    mm_us = graph_us(torch.matmul, [(x, x)])
    flag = torch.zeros(1, device="cuda")
    empty_us = graph_us(lambda: _empty_kernel[(1,)](flag), [()], calls=200)
    return {"bandwidth_gbs": 2 * 2**30 / copy_us / 1e3, "fp16_tflops": 2 * 8192**3 / mm_us / 1e6,
            "empty_kernel_us": empty_us}


def random_layer(n: int, k: int, width: int):
    """Packed random codes (full range of the width), per-channel fp16 scales and the offset, on the GPU."""
    codes = torch.randint(0, 2**width, (n, k), device="cuda")
    return pack_words(codes, width), (torch.rand(n, device="cuda") * 0.01 + 1e-3).half(), (2**width - 1) // 2


def linear_table(peaks: dict, quick: bool) -> None:
    emit("\n## Linear layers: y = x @ W.T, fp16 activations (µs; speed-up vs fp16 cuBLAS in brackets)\n")
    head = " | ".join([f"W{w} ours" for w in WIDTHS] + [f"W{w} output-major" for w in LAYOUT_WIDTHS])
    emit(f"| K x N | M | fp16 cuBLAS | torch dequant+mm (W2) | {head} | W2 path (best layout) | W2 GB/s (of peak) | "
         "W2 TFLOP/s (of peak) | W2 roofline | W4 roofline |")
    emit("|---|---|---|---|" + "---|" * (len(WIDTHS) + len(LAYOUT_WIDTHS)) + "---|---|---|---|---|")
    for k, n in LINEAR_SHAPES[:2] if quick else LINEAR_SHAPES:
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.float16)
        layers = {w: random_layer(n, k, w) for w in WIDTHS}
        for m in MS[:3] if quick else MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            row = [f"{k} x {n}", str(m)]
            try:
                t16 = graph_us(F.linear, [(x, w, bias) for w in cold_copies(w16)])
                row.append(f"{t16:.1f}")
                p2, s2, o2 = layers[2]
                torch_us = graph_us(ops.linear_reference, [(x, p, s2, bias, 2, o2, k) for p in cold_copies(p2)])
                row.append(f"{torch_us:.1f}")
                best: dict[int, tuple[float, str]] = {}
                runs = [(w, False) for w in WIDTHS] + [(w, True) for w in LAYOUT_WIDTHS]
                for w, transposed in runs:
                    p, s, o = layers[w]
                    copies = [output_major(c) if transposed else c for c in cold_copies(p)]
                    ref = ops.linear_reference(x.float(), p, s, bias, w, o, k)
                    got = triton_dispatch.linear(x, copies[0], s, bias, w, o, k).float()
                    chosen = describe(TUNER.last[1]) + (" (output-major)" if transposed else "")
                    us = graph_us(triton_dispatch.linear, [(x, c, s, bias, w, o, k) for c in copies])
                    err = ((got - ref).norm() / ref.norm()).item()
                    mark = "" if err < 5e-3 else f" ERR {err:.1e}"
                    row.append(f"{us:.1f} ({t16 / us:.2f}x){mark}")
                    if w not in best or us < best[w][0]:
                        best[w] = (us, chosen)
                w2_us, label = best[2]
                moved = p2.numel() * 4 + x.numel() * 2 + m * n * 2 + n * 4
                gbs, tflops = moved / w2_us / 1e3, 2 * m * n * k / w2_us / 1e6
                row += [label, f"{gbs:.0f} ({100 * gbs / peaks['bandwidth_gbs']:.0f}%)",
                        f"{tflops:.1f} ({100 * tflops / peaks['fp16_tflops']:.0f}%)"]
                for w in (2, 4):
                    row.append(roofline(peaks, m, n, k, layers[w][0], best[w][0]))
            except Exception as exc:  # noqa: BLE001 - report and go on: one bad row must not lose the table
                row.append(f"FAILED: {type(exc).__name__}: {str(exc)[:120]}")
                traceback.print_exc()
            emit("| " + " | ".join(row) + " |")
    emit(f"\nGB/s counts packed weights + activations + output over the W2 time (peak copy: "
         f"{peaks['bandwidth_gbs']:.0f} GB/s); TFLOP/s is 2MNK over the W2 time (peak fp16: "
         f"{peaks['fp16_tflops']:.0f}).")


def roofline(peaks: dict, m: int, n: int, k: int, packed: torch.Tensor, us: float) -> str:
    """The share of the card's limit a call reached: bandwidth at M <= 16 (memory-bound: packed weights,
    scales, activations and output), fp16 TFLOP/s above (compute-bound)."""
    if m <= 16:
        gbs = (packed.numel() * 4 + n * 2 + m * k * 2 + m * n * 2) / us / 1e3
        return f"{100 * gbs / peaks['bandwidth_gbs']:.0f}% of GB/s"
    return f"{100 * 2 * m * n * k / us / 1e6 / peaks['fp16_tflops']:.0f}% of TFLOP/s"


def conv_table(quick: bool) -> None:
    emit("\n## SD-1.5 convolutions, batch 2, fp16 (µs; speed-up vs fp16 cuDNN in brackets)\n")
    head = " | ".join(f"W{w} ours" for w in CONV_WIDTHS)
    emit(f"| C -> O, k, HxW, stride | fp16 cuDNN | torch dequant+conv (W4) | {head} | W4 path |")
    emit("|---|---|---|" + "---|" * len(CONV_WIDTHS) + "---|")
    for c, o, kk, h, st in CONV_SHAPES[:2] if quick else CONV_SHAPES:
        x = torch.randn(2, c, h, h, device="cuda", dtype=torch.float16)
        w16 = torch.randn(o, c, kk, kk, device="cuda", dtype=torch.float16) * 0.02
        bias = torch.randn(o, device="cuda", dtype=torch.float16)
        pad = kk // 2
        geometry = ([o, c, kk, kk], [st, st], [pad, pad], [1, 1])
        row = [f"{c} -> {o}, {kk}x{kk}, {h}x{h}, s{st}"]
        try:
            t16 = graph_us(F.conv2d, [(x, w, bias, st, pad) for w in cold_copies(w16)])
            row.append(f"{t16:.1f}")
            p4, s4, o4 = random_layer(o, c * kk * kk, 4)
            torch_us = graph_us(ops.conv2d_reference, [(x, p, s4, bias, 4, o4, *geometry, 1) for p in cold_copies(p4)])
            row.append(f"{torch_us:.1f}")
            label = "?"
            for w in CONV_WIDTHS:
                p, s, off = random_layer(o, c * kk * kk, w)
                ref = ops.conv2d_reference(x.float(), p, s, bias, w, off, *geometry, 1)
                got = triton_dispatch.conv2d(x, p, s, bias, w, off, *geometry, 1).float()
                if w == 4:
                    label = describe(TUNER.last[1])
                us = graph_us(triton_dispatch.conv2d, [(x, cp, s, bias, w, off, *geometry, 1) for cp in cold_copies(p)])
                err = ((got - ref).norm() / ref.norm()).item()
                row.append(f"{us:.1f} ({t16 / us:.2f}x)" + ("" if err < 5e-3 else f" ERR {err:.1e}"))
            row.append(label)
        except Exception as exc:  # noqa: BLE001
            row.append(f"FAILED: {type(exc).__name__}: {str(exc)[:120]}")
            traceback.print_exc()
        emit("| " + " | ".join(row) + " |")


def quantize_like_allocation(model: torch.nn.Module, allocation: dict) -> None:
    """Replace each layer the 1.99-bit allocation quantized by a low-bit layer with its levels (min-max scales).

    Speed depends on each layer's field width and shape, not on the scale values, so min-max codes
    on the GPU stand in for the CPU run's fitted scales.
    """
    from fxpress.ir.module_paths import replace_submodule
    from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear

    for path, entry in allocation["layers"].items():
        module = model.get_submodule(path)
        w = module.weight.detach().float()
        rows = w.reshape(w.shape[0], -1)
        qmin, levels = entry["qmin"], entry["levels"]
        qmax = qmin + levels - 1
        scale = (rows.abs().amax(dim=1) / max(abs(qmin), qmax)).clamp_min(1e-8)
        codes = torch.clamp(torch.round(rows / scale[:, None]), qmin, qmax).to(torch.int64)
        bias = None if module.bias is None else module.bias.detach()
        if entry["kind"] == "linear":
            new = LowBitLinear(codes, scale.half(), bias, qmin, levels)
        else:
            new = LowBitConv2d(codes.reshape(w.shape), scale.half(), bias, qmin, levels,
                               tuple(entry["stride"]), tuple(entry["padding"]), tuple(entry["dilation"]),
                               entry["groups"])
        replace_submodule(model, path, new)


def kernel_breakdown(fn) -> dict[str, float]:
    """GPU time (ms) of one fn() per kind of kernel, from the torch profiler (self device time)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds = (("_dequant_kernel", "fxpress dequant"), ("_lowbit_matmul", "fxpress GEMM"),
             ("_sum_splits", "fxpress GEMM"), ("_lowbit_small_m", "fxpress small-M GEMM"),
             ("_lowbit_gemv", "fxpress GEMV"), ("_lowbit_conv2d", "fxpress conv"), ("gemm", "cuBLAS GEMM"),
             ("conv", "cuDNN conv"), ("fmha", "attention"), ("flash", "attention"), ("attention", "attention"))
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        ms = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0)) / 1e3
        if ms <= 0:
            continue
        name = event.key.lower()
        kind = next((label for needle, label in kinds if needle.lower() in name), "other")
        totals[kind] = totals.get(kind, 0.0) + ms
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _batch(kwargs: dict, batch: int) -> dict:
    """The first `batch` rows of every batched tensor input (the zoo's examples hold 2)."""
    return {k: v[:batch] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] > 1 else v
            for k, v in kwargs.items()}


def _timed(fn) -> tuple[float, float]:
    """(eager ms, CUDA-graph replay ms; nan where capture fails) of one fn()."""
    with torch.no_grad():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        eager = (time.perf_counter() - start) / 10 * 1e3
        try:
            return eager, _graph_ms(fn)
        except RuntimeError as exc:
            print(f"CUDA graph capture failed: {exc}", flush=True)
            return eager, float("nan")


def _graph_ms(fn) -> float:
    with torch.no_grad():
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            with torch.cuda.graph(graph):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / 10 * 1e3


def uniform_allocation(model: torch.nn.Module, levels: int) -> dict:
    """An allocation giving every nn.Linear `levels` levels (a DiT has no searched allocation here)."""
    return {"layers": {p: {"kind": "linear", "qmin": -(levels // 2), "levels": levels}
                       for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}}


def model_forward(title: str, model: torch.nn.Module, example_kwargs: dict, allocation: dict | None,
                  levels: int, batches: list[int], layouts: list[str]) -> None:
    """fp16 forward against the quantized model lowered to Triton (each packed layout), per batch size."""
    from fxpress.backends import triton as triton_backend
    from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear

    model = model.half().cuda().eval()
    kwargs = {k: v.cuda().half() if isinstance(v, torch.Tensor) and v.is_floating_point() else
              v.cuda() if isinstance(v, torch.Tensor) else v for k, v in example_kwargs.items()}
    per_batch = {b: _batch(kwargs, b) for b in batches}
    with torch.no_grad():
        out16 = {b: model(**kw)[0].float() for b, kw in per_batch.items()}
    fp16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    t16 = {b: _timed(lambda kw=kw: model(**kw)) for b, kw in per_batch.items()}
    try:
        split16 = kernel_breakdown(lambda: model(**per_batch[batches[-1]]))
    except Exception as exc:  # noqa: BLE001 - the breakdown is an extra; timings above stand without it
        split16 = {"profiler failed": str(exc)[:80]}
    quantize_like_allocation(model, allocation or uniform_allocation(model, levels))
    low = [m for m in model.modules() if isinstance(m, (LowBitLinear, LowBitConv2d))]
    with torch.no_grad():
        reference = {b: model(**kw)[0].float() for b, kw in per_batch.items()}  # torch reference path
    packed_bytes = sum(m.packed.numel() * 4 + m.scale.numel() * m.scale.element_size() for m in low)
    rest = sum(p.numel() * p.element_size() for p in model.parameters())
    rest += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.endswith((".packed", ".scale")))
    widths: dict[int, int] = {}
    for m in low:
        widths[m.width] = widths.get(m.width, 0) + 1
    emit(f"\n## {title}, fp16\n")
    shapes = {k: tuple(v.shape) for k, v in per_batch[batches[-1]].items() if isinstance(v, torch.Tensor)}
    emit(f"inputs (batch {batches[-1]}) {shapes}; {len(low)} low-bit layers with field widths "
         f"{dict(sorted(widths.items()))}\n")
    emit("| model | batch | weights in GPU memory | eager forward | CUDA-graph forward | vs fp16 (graph) | "
         "rel. error vs torch reference |")
    emit("|---|---|---|---|---|---|---|")
    for b in batches:
        emit(f"| fp16 | {b} | {fp16_bytes / 1e6:.0f} MB | {t16[b][0]:.2f} ms | {t16[b][1]:.2f} ms | 1.00x | — |")
    notes, split_low = [], {}
    for layout in layouts:
        triton_backend.unlower(model)
        triton_backend.lower(model, device="cuda", weight_layout=layout)
        for b, kw in per_batch.items():
            start = time.perf_counter()
            with torch.no_grad():
                lowered = model(**kw)[0].float()  # first call: tunes and compiles every shape
            notes.append(f"{layout} batch {b} first call {time.perf_counter() - start:.0f} s")
            tlow = _timed(lambda kw=kw: model(**kw))
            rel = ((lowered - reference[b]).norm() / reference[b].norm()).item()
            emit(f"| W{'/'.join(map(str, sorted(widths)))} Triton, {layout} | {b} | "
                 f"{(packed_bytes + rest) / 1e6:.0f} MB | {tlow[0]:.2f} ms | {tlow[1]:.2f} ms | "
                 f"{t16[b][1] / tlow[1]:.2f}x | {rel:.1e} |")
        try:
            split_low[layout] = kernel_breakdown(lambda: model(**per_batch[batches[-1]]))
        except Exception as exc:  # noqa: BLE001
            split_low[layout] = {"profiler failed": str(exc)[:80]}
    drift = max(((reference[b] - out16[b]).norm() / out16[b].norm()).item() for b in batches)
    emit(f"\nQuantized vs fp16 output rel. difference {drift:.2f} (random weights, min-max codes). "
         f"Tuning + compiling: {'; '.join(notes)}.")
    fmt = lambda split: ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in split.items())  # noqa: E731
    emit(f"\nGPU time per kind of kernel, one eager forward at batch {batches[-1]} (ms): fp16: {fmt(split16)}; "
         + "; ".join(f"{layout}: {fmt(split)}" for layout, split in split_low.items()) + ".")
    paths: dict[str, int] = {}
    for choice in TUNER._load().values():
        paths[choice.path] = paths.get(choice.path, 0) + 1
    emit(f"Tuned choices so far (all shapes seen in this process and the cache): {paths}.")


def unet_forward(allocation_path: Path, layouts: list[str]) -> None:
    """The SD-1.5 UNet (64x64 latents) at batch 1 and 2 with the 1.99-bit allocation."""
    from fxpress.frontends import zoo

    entry = zoo.get("sd15-unet")
    torch.manual_seed(0)
    start = time.perf_counter()
    model = entry.build()
    print(f"built SD-1.5 UNet in {time.perf_counter() - start:.0f} s", flush=True)
    example = entry.example_inputs()
    model_forward("SD-1.5 UNet forward, 64x64 latents, 1.99-bit allocation", model, example.kwargs,
                  json.loads(allocation_path.read_text()), 0, [1, 2], layouts)


def dit_forward(layouts: list[str]) -> None:
    """DiT-XL/2 (hidden 1152, 28 blocks, 32x32 latents: 256 tokens) at batch 1 and 2, every linear at 2 bits."""
    from diffusers import DiTTransformer2DModel

    from fxpress.frontends import zoo

    config = {**zoo.DIT_S_CONFIG, "num_attention_heads": 16, "attention_head_dim": 72, "num_layers": 28}
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**config)
    example = zoo.get("dit-s").example_inputs()
    model_forward("DiT-XL/2 forward, 32x32 latents, every linear W2", model, example.kwargs, None, 4, [1, 2],
                  layouts)


SECTIONS = ("linear", "conv", "unet", "dit")


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, in order: {SECTIONS}")
    parser.add_argument("--quick", action="store_true", help="two shapes, three M values")
    parser.add_argument("--out", default=None, help="append the tables to this markdown file")
    parser.add_argument("--timings", default=None, help="write every tuned candidate's time (µs) to this JSON")
    parser.add_argument("--layouts", default="k-major,output-major",
                        help="packed layouts the model forwards lower to (comma-separated)")
    parser.add_argument("--allocation", default=str(Path(__file__).parent / "results" /
                                                    "sd15_allocation_1.99bit.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("benchmarks/lowbit_kernels.py needs a CUDA GPU (and TRITON_INTERPRET unset)")
    OUT = Path(args.out) if args.out else None
    emit(f"\n# Low-bit kernels on {torch.cuda.get_device_name()} (torch {torch.__version__}, "
         f"triton {triton.__version__}): {args.sections}")
    for section in args.sections.split(","):
        try:
            if section == "linear":
                peaks = measure_peaks()
                emit(f"\nMeasured: copy {peaks['bandwidth_gbs']:.0f} GB/s (read + write), fp16 8192^3 matmul "
                     f"{peaks['fp16_tflops']:.0f} TFLOP/s, empty Triton kernel {peaks['empty_kernel_us']:.1f} µs.")
                linear_table(peaks, args.quick)
            elif section == "conv":
                conv_table(args.quick)
            elif section == "unet":
                unet_forward(Path(args.allocation), args.layouts.split(","))
            elif section == "dit":
                dit_forward(args.layouts.split(","))
            else:
                sys.exit(f"unknown section {section!r}; choose from {SECTIONS}")
        except Exception as exc:  # noqa: BLE001 - a failed section is reported, the next one still runs
            emit(f"\nSection {section} FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        if args.timings:
            Path(args.timings).write_text(json.dumps(TUNER.timings, indent=1))


if __name__ == "__main__":
    main()
