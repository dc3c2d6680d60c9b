"""Benchmark: TextCraftor reward fine-tuning on the digits and shapes testbeds (PAPERS.md §4, issue 22).

Per testbed, a style reward no prompt asks for (digits: `thick` strokes; shapes: `upright` rotation, or
`warm` with --unsaid colour: a palette among the colours the denoiser saw, on prompts that leave the colour
unsaid; with every factor named, the shapes denoiser has no other colours than its palette's, so a colour
style can only be hacked there) and its opposite (`thin`, `tilted`, `cool`) for interpolation, with the
alignment reward (log-probability of the named factors under a second classifier; the testbed's committed
classifier judges accuracy) as the constraint:

  encoder        the text encoder tuned on style + alignment (TextCraftor), seeds --seeds
  no alignment   the same on the style reward alone
  enc -> den     the tuned encoder frozen, then the denoiser tuned on the same rewards (same seeds)
  K table        seed 0 with K = 1, 2, 5 and all sampler steps with gradients: gain, and the peak memory of
                 one update measured in a fresh process per setting (checkpointing on and off)
  quantized      each tuned encoder compressed to 4 bits (uniform) and 1.99 bits (BitsFusion): gain kept
  interpolation  weight space (tuned <-> original, tuned <-> opposite) and embedding space (w e_tuned +
                 (1 - w) e_orig at every step) for w in 0, 0.25, ..., 1: reward and Spearman rho

Everything is measured on the held-out prompts (every third caption naming all factors, or all but those
--unsaid names) with fixed noise seeds. Mean ± σ over training seeds. A run of another style or --unsaid
under a --tag is a record of its own: --combine digits shapes shapes.<tag>.

Run: .venv/bin/python benchmarks/textcraftor.py --testbed digits   (then --testbed shapes; then --combine)
Writes benchmarks/results/textcraftor.<testbed>.json, and with --combine textcraftor.md and textcraftor.png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FXPRESS_QUIET", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from fxpress.api import compress  # noqa: E402
from fxpress.errors import FxpressError  # noqa: E402
from fxpress.passes.reward.finetune import RewardConfig  # noqa: E402
from fxpress.testbed.classifier import FactorClassifier  # noqa: E402
from fxpress.testbed.grid import grid_png  # noqa: E402
from fxpress.testbed.models import Testbed, load_testbed  # noqa: E402
from fxpress.testbed.sampling import seeded_noise  # noqa: E402
from fxpress.testbed.specs import TESTBEDS  # noqa: E402
from fxpress.testbed.tuning import (  # noqa: E402
    evaluate_tuning,
    generate,
    make_rewards,
    prompt_set,
    prompt_split,
    reward_classifier,
    sample_accuracy,
    sampler_spec,
)
from fxpress.training.blend import blend_weights, blended_sample  # noqa: E402
from fxpress.training.prompt_set import encode_ids  # noqa: E402
from fxpress.training.reward_sampling import truncated_sample  # noqa: E402
from fxpress.tune import TuneRecipe, tune  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STYLES = {"digits": ("thick", "thin"), "shapes": ("upright", "tilted")}
WEIGHTS = [0.0, 0.25, 0.5, 0.75, 1.0]
SECTIONS = ("no-alignment", "den", "quant", "k", "interp", "memory")


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for m in range(i, j + 1):
                out[order[m]] = (i + j) / 2
            i = j + 1
        return out
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / norm if norm else float("nan")


def with_parts(testbed: Testbed, **parts) -> Testbed:
    """A shallow copy of `testbed` with some parts replaced."""
    out = copy.copy(testbed)
    for name, module in parts.items():
        setattr(out, name, module)
    return out


def config(args, seed: int, grad_steps: int | None = None) -> RewardConfig:
    k = args.grad_steps if grad_steps is None else grad_steps
    return RewardConfig(steps=args.steps, batch=args.batch, lr=args.lr, grad_steps=None if k == 0 else k,
                        seed=seed, drift_limit=args.drift_limit, drift_weight=args.drift_weight)


def run_tune(testbed, rewards: dict[str, float], target: str, cfg: RewardConfig, classifier, prompts,
             hinge: bool = False):
    began = time.perf_counter()
    keep = ("alignment",) if hinge and "alignment" in rewards else ()
    recipe = TuneRecipe(rewards=tuple(rewards.items()), target=target, train=cfg, keep=keep)
    result = tune(testbed, recipe, classifier=classifier, prompts=prompts)
    if keep:
        print("floors", result.reports[0]["floors"], flush=True)
    return result.testbed, round(time.perf_counter() - began, 1)


def quantized_encoder(encoder, ids: torch.Tensor, recipe: str, bits: float):
    """The encoder compressed by `recipe` at `bits` (fxpress.compress on the captured CLIPTextModel)."""
    result = compress(encoder, (ids,), recipe, target_bits=bits, verify=False)
    return result.model.eval(), result.summary["weights_only_bits"]


@torch.no_grad()
def embedding_blend_eval(testbed, tuned_encoder, rewards, held, per_prompt: int, weight: float,
                         last_steps: int | None = None, denoiser=None) -> dict[str, float]:
    """Held-out scores of samples whose steps (the last `last_steps` only, the earlier ones on the original
    encoder) use w e_tuned + (1 - w) e_orig."""
    spec = sampler_spec(testbed)
    ids = held.input_ids.repeat_interleave(per_prompt, 0)
    shape = (testbed.spec.channels, testbed.spec.resolution, testbed.spec.resolution)
    noise = seeded_noise(len(ids), shape, 0)
    tuned = (encode_ids(tuned_encoder, ids), encode_ids(tuned_encoder, held.unconditional))
    orig = (encode_ids(testbed.text_encoder, ids), encode_ids(testbed.text_encoder, held.unconditional))
    images = blended_sample(spec, denoiser or testbed.denoiser, noise, tuned, orig, weight,
                            last_steps=last_steps).clamp(-1, 1)
    return evaluate_tuning(testbed, rewards, held, per_prompt, images=images)


def memory_child(testbed_name: str, grad_steps: int, checkpoint: bool, batch: int, style: str) -> None:
    """Run one update's forward and backward and print its peak memory above the resident set before it (the
    kernel's high-water mark, reset just before the step) and the bytes autograd saved for the backward."""
    torch.set_num_threads(1)
    testbed = load_testbed(testbed_name)
    spec = sampler_spec(testbed)
    prompts = prompt_set(testbed, prompt_split(testbed)[0])
    tb = testbed.spec  # a classifier-read style needs a classifier; its weights do not change the memory
    reader = FactorClassifier(tb.channels, tb.resolution, tb.factors, angles=tb.angles)
    rewards = make_rewards(testbed, {style: 1.0}, reader)
    encoder = testbed.text_encoder.train().requires_grad_(True)
    ids = prompts.input_ids[torch.arange(batch) % len(prompts)]
    shape = (testbed.spec.channels, testbed.spec.resolution, testbed.spec.resolution)
    noise = seeded_noise(batch, shape, 0)
    with torch.no_grad():  # warm-up: allocator pools and lazy initialisation outside the measured step
        truncated_sample(spec, testbed.denoiser, noise, encode_ids(encoder, ids),
                         encode_ids(encoder, prompts.unconditional), grad_steps=None)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set (VmHWM) restarts from here
    before = _status_kib("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        both = encode_ids(encoder, torch.cat([ids, prompts.unconditional]))
        cond, uncond = both.split([batch, 1])
        images = truncated_sample(spec, testbed.denoiser, noise, cond, uncond, grad_steps=grad_steps or None,
                                  checkpoint=checkpoint)
        loss, _ = rewards.loss(images)
    loss.backward()
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - before) / 1024, "saved_mib": saved[0] / 2 ** 20}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_table(testbed_name: str, style: str, batch: int, steps: list[int]) -> list[dict]:
    rows = []
    for checkpoint in (False, True):
        for k in steps:
            command = [sys.executable, __file__, "--memory-child", testbed_name, str(k), str(int(checkpoint)),
                       str(batch), style]
            done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-2000:])
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"grad_steps": k or "all", "checkpoint": checkpoint, **measured})
            print("memory", rows[-1], flush=True)
    return rows


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_testbed(args, defaults: dict) -> None:
    if args.append and set(args.sections) & {"k", "interp", "memory"}:
        raise SystemExit("--append adds seeds to per-seed rows: give --sections among no-alignment den quant")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    began = time.perf_counter()
    testbed = load_testbed(args.testbed)
    style, opposite = args.style or STYLES[args.testbed][0], args.opposite or STYLES[args.testbed][1]
    args.cache.mkdir(parents=True, exist_ok=True)
    classifier = reward_classifier(testbed, path=args.cache / f"{args.testbed}_reward_classifier.safetensors")
    train, held_prompts = prompt_split(testbed, args.unsaid)
    held, train_set = prompt_set(testbed, held_prompts), prompt_set(testbed, train)
    scorer = make_rewards(testbed, {style: 1.0, "alignment": 1.0}, classifier)
    n = args.per_prompt

    def score(tb) -> dict[str, float]:
        out = evaluate_tuning(tb, scorer, held, n)
        if tb is not testbed and args.grad_steps:  # also with the tuned encoder on the last K steps only
            late = embedding_blend_eval(testbed, tb.text_encoder, scorer, held, n, 1.0, args.grad_steps, tb.denoiser)
            out.update({f"late {k}": v for k, v in late.items()})
        return out

    named = prompt_set(testbed, prompt_split(testbed)[1]) if args.unsaid else None  # every factor named

    def named_accuracy(tb) -> dict[str, float]:
        """Accuracy on the held-out prompts that name every factor (4 samples each): does a style tuned
        where a factor is unsaid leave the prompts that name it alone?"""
        if named is None:
            return {}
        images, targets = generate(tb, named, 4)
        return {"named accuracy": sample_accuracy(tb, images, targets)}

    out = RESULTS / f"textcraftor.{args.testbed}{'.' + args.tag if args.tag else ''}.json"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.append:  # seeds are named as they finish
        settings["seeds"] = []
    if args.append and out.is_file():  # more seeds of the same run: keep its rows, add these seeds' rows
        record = json.loads(out.read_text())
        skip = {"seeds", "append", "sections"}
        old = {**defaults, **record["settings"]}  # a record older than an option ran with its default
        differ = {k: (old.get(k), v) for k, v in settings.items() if k not in skip and old.get(k) != v}
        if differ:
            raise SystemExit(f"--append: {out.name} was run with other settings (old, new): {differ}")
        clash = set(record["settings"]["seeds"]) & set(args.seeds)
        if clash:
            raise SystemExit(f"--append: {out.name} already holds seeds {sorted(clash)}")
        record["commands"].append("python benchmarks/textcraftor.py " + " ".join(sys.argv[1:]))
    else:
        record = {"testbed": args.testbed, "style": style, "opposite": opposite,
                  "commands": ["python benchmarks/textcraftor.py " + " ".join(sys.argv[1:])],
                  "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
                             f"torch {torch.__version__}",
                  "settings": settings,
                  "prompts": {"train": len(train), "held_out": len(held_prompts), "per_prompt": n},
                  "base": {**score(testbed), **named_accuracy(testbed)}, "runs": {}, "seconds": {}}

    def save():
        out.write_text(json.dumps(record, indent=1))

    print("base", record["base"], flush=True)
    both = {style: 1.0, "alignment": args.align_weight}
    hinge = args.constraint == "hinge"
    tuned = {}
    sections = set(args.sections)
    seed0 = args.seeds[0]

    def add(label: str, key, model, seconds: float) -> None:
        tuned[(label, key)] = model
        row = {**score(model), **(named_accuracy(model) if label == "encoder" else {}), "seed": key}
        record["runs"].setdefault(label, []).append(row)
        if args.append and label == "encoder":  # the record names the seeds it holds, should this run stop
            record["settings"]["seeds"].append(key)
        record["seconds"][f"{label}/{key}"] = seconds
        print(label, key, seconds, record["runs"][label][-1], flush=True)
        save()

    for seed in args.seeds:
        add("encoder", seed, *run_tune(testbed, both, "encoder", config(args, seed), classifier, train_set, hinge))
        if "no-alignment" in sections:
            add("no alignment", seed, *run_tune(testbed, {style: 1.0}, "encoder", config(args, seed), classifier,
                                                train_set))
        if "den" in sections:
            den = dataclasses.replace(config(args, seed), lr=args.den_lr, drift_limit=None)
            add("enc -> den", seed, *run_tune(tuned[("encoder", seed)], both, "denoiser", den, classifier, train_set,
                                               hinge))
    if "quant" in sections:
        ids = held.input_ids
        for label, recipe, bits in (("4-bit", "uniform", 4.0), ("1.99-bit", "bitsfusion", 1.99)):
            q_orig, _ = quantized_encoder(testbed.text_encoder, ids[:2], recipe, bits)
            record[f"base {label}"] = score(with_parts(testbed, text_encoder=q_orig))
            rows = []
            for seed in args.seeds:
                q, achieved = quantized_encoder(tuned[("encoder", seed)].text_encoder, ids[:2], recipe, bits)
                rows.append({**score(with_parts(testbed, text_encoder=q)), "bits": achieved, "seed": seed})
            record["runs"][f"encoder {label}"] = record["runs"].get(f"encoder {label}", []) + rows
            print(label, rows, flush=True)
            save()
    if "k" in sections:
        k_runs = {args.grad_steps: record["runs"]["encoder"][0]}
        for k in args.k_table:
            if k == args.grad_steps:
                continue
            try:
                model, seconds = run_tune(testbed, both, "encoder", config(args, seed0, k), classifier, train_set,
                                          hinge)
            except FxpressError as exc:  # K = 1 where the last step is the identity is refused: record why
                k_runs[k] = {"refused": str(exc)}
                print("K", k, "refused", exc, flush=True)
                continue
            k_runs[k] = score(model)
            record["seconds"][f"K={k or 'all'}"] = seconds
            print("K", k, seconds, k_runs[k], flush=True)
        record["k_runs"] = {str(k or "all"): v for k, v in k_runs.items()}
        save()
    if "interp" in sections:
        add("opposite", seed0, *run_tune(testbed, {opposite: 1.0, "alignment": args.align_weight}, "encoder",
                                         config(args, seed0), classifier, train_set, hinge))
        main_model, opposite_model = tuned[("encoder", seed0)], tuned[("opposite", seed0)]
        curves = {"weights: tuned <-> original": [], "weights: tuned <-> opposite": [],
                  "embeddings: tuned <-> original": []}
        for w in WEIGHTS:
            blend = blend_weights(main_model.text_encoder, testbed.text_encoder, w)
            curves["weights: tuned <-> original"].append(score(with_parts(testbed, text_encoder=blend)))
            blend = blend_weights(main_model.text_encoder, opposite_model.text_encoder, w)
            curves["weights: tuned <-> opposite"].append(score(with_parts(testbed, text_encoder=blend)))
            curves["embeddings: tuned <-> original"].append(
                embedding_blend_eval(testbed, main_model.text_encoder, scorer, held, n, w))
            print("blend", w, {k: round(v[-1][style], 4) for k, v in curves.items()}, flush=True)
        record["interpolation"] = {
            "weights": WEIGHTS, "curves": curves,
            "spearman": {k: spearman(WEIGHTS, [r[style] for r in v]) for k, v in curves.items()},
            "spearman_eval": {k: spearman(WEIGHTS, [r[f"{style}/eval"] for r in v]) for k, v in curves.items()}}
        save()
    if "memory" in sections:
        record["memory"] = memory_table(args.testbed, style, args.batch, args.k_table)
        save()
    if args.append:  # the grid and the total time belong to the first seeds' run
        return
    grid_prompts = prompt_set(testbed, held_prompts[:8])
    shown = {"original": testbed, **{f"{label}" if label != "opposite" else f"encoder ({opposite})": model
                                     for (label, key), model in tuned.items() if key == seed0}}
    panels = {label: generate(model, grid_prompts, 4)[0] for label, model in shown.items()}
    grid_file = args.cache / f"{out.stem.removeprefix('textcraftor.')}_grid.safetensors"  # shapes.warm_grid...
    save_file({k: v.contiguous() for k, v in panels.items()}, str(grid_file))
    record["grid_prompts"] = [c for c, _ in held_prompts[:8]]
    record["seconds"]["total"] = round(time.perf_counter() - began, 1)
    save()
    print("done in", record["seconds"]["total"], "s", flush=True)


def fmt(mean_sd: tuple[float, float], digits: int = 4) -> str:
    return f"{mean_sd[0]:.{digits}f} ± {mean_sd[1]:.{digits}f}"


def combine(names: list[str], cache: Path, notes: Path | None = None) -> None:
    """Write textcraftor.md and textcraftor.png from the per-testbed records."""
    lines = ["# TextCraftor: reward fine-tuning of the text encoder (issue 22)", ""]
    plots = {}
    grids = {}
    for name in names:
        rec = json.loads((RESULTS / f"textcraftor.{name}.json").read_text())
        for extra in sorted(RESULTS.glob(f"textcraftor.{name}.*.json")):  # tagged runs: rows and missing sections
            more = json.loads(extra.read_text())
            if (more["style"], more["settings"].get("unsaid", [])) != (rec["style"], rec["settings"].get("unsaid", [])):
                continue  # another style, or other prompts: a record of its own (--combine shapes.<tag>)
            tag = extra.name.removeprefix(f"textcraftor.{name}.").removesuffix(".json")
            for label, rows in more["runs"].items():
                rec["runs"][f"{label} ({tag}: {_changed(rec, more)})"] = rows
            for section in ("k_runs", "memory", "interpolation"):
                if section not in rec and section in more:
                    rec[section] = more[section]
                    rec.setdefault("sections_from", {})[section] = f"{tag}: {_changed(rec, more)}"
        style, opposite = rec["style"], rec["opposite"]
        base = rec["base"]
        s = rec["settings"]
        unsaid = s.get("unsaid") or []
        lines += [f"## {name}: style reward `{style}` (opposite `{opposite}`), constraint `alignment`", "",
                  f"{rec['prompts']['train']} training prompts, {rec['prompts']['held_out']} held-out prompts"
                  f"{' (leaving ' + ' and '.join(unsaid) + ' unsaid)' if unsaid else ''} x "
                  f"{rec['prompts']['per_prompt']} fixed-seed samples; {s['steps']} updates of batch {s['batch']}, "
                  f"lr {s['lr']}, K = {s['grad_steps'] or 'all'}, alignment weight {s['align_weight']}, training seeds "
                  f"{s['seeds']}. Machine: {rec['machine']}.", "",
                  f"| model | {style} reward | {style} evaluator | alignment | accuracy |", "|---|---|---|---|---|",
                  f"| original | {base[style]:.4f} | {base[style + '/eval']:.4f} | {base['alignment']:.3f} | "
                  f"{base['accuracy']:.3f} |"]
        fixed = ["encoder", "no alignment", "enc -> den", "encoder 4-bit", "encoder 1.99-bit", "opposite"]
        for label in fixed + [k for k in rec["runs"] if k not in fixed]:
            rows = rec["runs"].get(label)
            if not rows:
                continue
            for mode in ("", "late "):
                if mode + style not in rows[0] or (mode and not s["grad_steps"]):  # K = all: no "last K" mode
                    continue
                cols = [summary([r[mode + k] for r in rows]) for k in (style, f"{style}/eval", "alignment", "accuracy")]
                shown = label + (f" (tuned embeddings on the last {s['grad_steps']} steps only)" if mode else "")
                if len(rows) != len(s["seeds"]):  # a run stopped early, or one seed by design (opposite)
                    shown += f", {len(rows)} seed{'s' if len(rows) > 1 else ''}"
                lines.append(f"| {shown} | {fmt(cols[0])} | {fmt(cols[1])} | {fmt(cols[2], 3)} | {fmt(cols[3], 3)} |")
        enc = rec["runs"]["encoder"]
        gain = summary([r[style] - base[style] for r in enc])
        sd = summary([r[style] for r in enc])[1]
        acc_drop = base["accuracy"] - summary([r["accuracy"] for r in enc])[0]
        worst = min(r["accuracy"] for r in enc) - base["accuracy"]
        spread = (f" = {gain[0] / sd if sd else float('inf'):.1f} σ_seed (σ_seed {sd:.4f})" if len(enc) > 1
                  else " (one seed, no σ_seed)")
        lines += ["", f"Encoder-only gain {gain[0]:+.4f}{spread}; evaluator change "
                      f"{summary([r[style + '/eval'] - base[style + '/eval'] for r in enc])[0]:+.4f}; accuracy "
                      f"change {-acc_drop * 100:+.1f} points (worst seed {worst * 100:+.1f})."]
        for label, rows in rec["runs"].items():  # the tagged runs of the encoder alone, each on its own line
            if label.startswith("encoder ("):
                gains = [r[style] - base[style] for r in rows]
                mean, spread = summary(gains)
                accuracy = [r["accuracy"] - base["accuracy"] for r in rows]
                ratio = f"{mean / spread:.1f} σ_seed (σ_seed {spread:.4f}, " if len(rows) > 1 else "no σ ("
                lines.append(f"{label}: gain {mean:+.4f} = {ratio}{len(rows)} seed(s); per seed "
                             f"{', '.join(f'{g:+.4f}' for g in gains)}); accuracy change "
                             f"{statistics.fmean(accuracy) * 100:+.1f} points (worst seed {min(accuracy) * 100:+.1f}).")
        varieties = [k for k in base if k.endswith(" variety")]
        for key in varieties:  # how much of an unsaid factor's variety each model keeps
            shown = [f"{label} {fmt(summary([r[key] for r in rows]), 2)}" for label, rows in rec["runs"].items()
                     if key in rows[0]]
            lines.append(f"{key.capitalize()} (entropy in bits of the judge's reading on the held-out samples; "
                         f"{math.log2(TESTBEDS[rec['testbed']].factors[key.split()[0]]):.2f} is uniform): original "
                         f"{base[key]:.2f}, {', '.join(shown)}.")
        if "named accuracy" in base:
            named = [r["named accuracy"] for r in enc]
            lines.append(f"On the held-out prompts that name every factor (4 samples each), accuracy "
                         f"{base['named accuracy']:.3f} before, {fmt(summary(named), 3)} after (per seed "
                         f"{', '.join(f'{a:.3f}' for a in named)}).")
        if "late " + style in enc[0] and s["grad_steps"]:
            late_gain = summary([r["late " + style] - base[style] for r in enc])
            late_sd = summary([r["late " + style] for r in enc])[1]
            late_acc = summary([r["late accuracy"] for r in enc])[0] - base["accuracy"]
            lines.append(f"With the tuned embeddings on the last {s['grad_steps']} steps only: gain "
                         f"{late_gain[0]:+.4f} = {late_gain[0] / late_sd if late_sd else float('inf'):.1f} σ_seed, "
                         f"accuracy change {late_acc * 100:+.1f} points.")
        for label, den in rec["runs"].items():
            if label.startswith("enc -> den"):
                change = (summary([r["accuracy"] for r in den])[0] - base["accuracy"]) * 100
                lines.append(f"{label}: gain {summary([r[style] - base[style] for r in den])[0]:+.4f}, accuracy "
                             f"change {change:+.1f} points.")
        lines.append("")
        for label in ("4-bit", "1.99-bit"):
            rows = rec["runs"].get(f"encoder {label}")
            if not rows:
                continue
            pairs = _same_seeds(rows, enc)
            kept = [(q[style] - base[style]) / (r[style] - base[style]) for q, r in pairs]
            kept_q = [(q[style] - rec[f"base {label}"][style]) / (r[style] - base[style]) for q, r in pairs]
            lines.append(f"- encoder at {label} ({statistics.fmean(q['bits'] for q in rows):.2f} bits per weight): "
                         f"keeps {statistics.fmean(kept) * 100:.0f}% of the gain against the float original "
                         f"(per seed {', '.join(f'{k * 100:.0f}%' for k in kept)}); "
                         f"{statistics.fmean(kept_q) * 100:.0f}% against the original at the same bits")
        if "k_runs" in rec:
            where = rec.get("sections_from", {}).get("k_runs")
            lines += ["", f"K (sampler steps with gradients), seed 0{f' (run {where})' if where else ''}:", "",
                      "| K | gain | accuracy | peak memory, no checkpointing (MiB) | saved activations (MiB) | "
                      "peak memory, checkpointing (MiB) |", "|---|---|---|---|---|---|"]
            memory = {(str(m["grad_steps"]), m["checkpoint"]): m for m in rec.get("memory", [])}
            for k, run in rec["k_runs"].items():
                plain, ck = memory.get((k, False)), memory.get((k, True))
                mem = (f"{plain['peak_mib']:.0f} | {plain['saved_mib']:.0f} | {ck['peak_mib']:.0f}" if plain and ck
                       else "- | - | -")
                if "refused" in run:
                    lines.append(f"| {k} | refused: the last step leaves the sample as it is | - | {mem} |")
                else:
                    lines.append(f"| {k} | {run[style] - base[style]:+.4f} | {run['accuracy']:.3f} | {mem} |")
        if "interpolation" in rec:
            interp = rec["interpolation"]
            where = rec.get("sections_from", {}).get("interpolation")
            run = f", run {where}" if where else ""
            lines += ["", f"Interpolation (seed 0{run}; `{style}` reward and evaluator at w = {interp['weights']}):",
                      "",
                      "| path | reward by w | evaluator by w | Spearman ρ (reward) | ρ (evaluator) |",
                      "|---|---|---|---|---|"]
            lines_after = []
            for path, rows in interp["curves"].items():
                lines_after += [f"- {path}: {key} by w " + " / ".join(f"{r[key]:.2f}" for r in rows)
                                for key in varieties if key in rows[0]]
                rewards = " / ".join(f"{r[style]:.4f}" for r in rows)
                evaluators = " / ".join(f"{r[style + '/eval']:.3f}" for r in rows)
                lines.append(f"| {path} | {rewards} | {evaluators} | "
                             f"{interp['spearman'][path]:.2f} | {interp['spearman_eval'][path]:.2f} |")
                plots[f"{name}: {path}"] = (interp["weights"], [r[style] for r in rows], style)
            lines += [""] * bool(lines_after) + lines_after
        lines += ["", f"Seconds: {rec['seconds']}", ""]
        grid_file = cache / f"{name}_grid.safetensors"
        if grid_file.is_file():
            panels = load_file(str(grid_file))  # safetensors keeps no order: the run's order again
            first = [k for k in ("original", "encoder", "no alignment", "enc -> den") if k in panels]
            grids[name] = ({k: panels[k] for k in first + sorted(set(panels) - set(first))}, rec["grid_prompts"])
    if notes is not None:
        lines += ["## Notes", "", notes.read_text().strip()]
    (RESULTS / "textcraftor.md").write_text("\n".join(lines) + "\n")
    _plot(plots, RESULTS / "textcraftor.png")
    for name, (panels, prompts) in grids.items():
        (RESULTS / f"textcraftor_{name}_grid.png").write_bytes(grid_png(panels, len(prompts), 4, labels=prompts))


def _same_seeds(rows: list[dict], enc: list[dict]) -> list[tuple[dict, dict]]:
    """Pair each quantized row with its float encoder's row: by seed where rows name it, else in order."""
    by_seed = {r["seed"]: r for r in enc if "seed" in r}
    return [(q, by_seed[q["seed"]]) if "seed" in q and q["seed"] in by_seed else (q, r) for q, r in zip(rows, enc)]


def _changed(rec: dict, more: dict) -> str:
    """The settings a tagged run changed against the main one."""
    skip = {"tag", "sections", "seeds", "combine", "append"} | ({"drift_weight"} if more["settings"].get("drift_limit")
                                                                 is None else set())
    return ", ".join(f"{k} {v}" for k, v in more["settings"].items()
                     if k not in skip and rec["settings"].get(k) != v) or "same settings"


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    testbeds = list(dict.fromkeys(label.split(":")[0] for label in curves))
    fig, axes = plt.subplots(1, len(testbeds), figsize=(5.5 * len(testbeds), 4), squeeze=False)
    for label, (ws, ys, style) in curves.items():
        ax = axes[0][testbeds.index(label.split(":")[0])]
        ax.plot(ws, ys, marker="o", label=label.split(": ", 1)[1])
        ax.set_title(f"{label.split(':')[0]}: {style} reward vs w")
        ax.set_xlabel("w (1 = tuned)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        name, k, ck, batch, style = sys.argv[2:7]
        memory_child(name, int(k), bool(int(ck)), int(batch), style)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--testbed", choices=list(STYLES))
    parser.add_argument("--style", default=None, help="the style reward (default: thick on digits, upright on shapes)")
    parser.add_argument("--opposite", default=None, help="its opposite, for interpolation (thin, tilted)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--den-lr", type=float, default=1e-5, help="learning rate of the denoiser stage")
    parser.add_argument("--grad-steps", type=int, default=5)
    parser.add_argument("--k-table", type=int, nargs="+", default=[1, 2, 5, 0], help="0: every step")
    parser.add_argument("--align-weight", type=float, default=0.1)
    parser.add_argument("--constraint", choices=("weight", "hinge"), default="weight",
                        help="alignment as a weighted objective, or as a hinge at the original's level (--keep)")
    parser.add_argument("--drift-limit", type=float, default=None,
                        help="trust region of the encoder stage: relative distance of the embeddings allowed")
    parser.add_argument("--drift-weight", type=float, default=100.0)
    parser.add_argument("--append", action="store_true",
                        help="add --seeds to the existing record of the same settings and --tag (a run over sessions)")
    parser.add_argument("--per-prompt", type=int, default=16)
    parser.add_argument("--unsaid", nargs="*", default=[], metavar="FACTOR",
                        help="factors the prompts leave unsaid (shapes: colour, so that a palette style may pick it)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fxpress_textcraftor_cache"))
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS),
                        help="what to run besides the encoder tuning itself (none: the encoder alone)")
    parser.add_argument("--tag", default="", help="write textcraftor.<testbed>.<tag>.json: a further run whose "
                                                   "rows --combine adds to the testbed's table")
    parser.add_argument("--combine", nargs="+", default=None)
    parser.add_argument("--notes", type=Path, default=None, help="with --combine: markdown appended to the tables")
    args = parser.parse_args()
    if args.combine:
        combine(args.combine, args.cache, args.notes)
    elif args.testbed:
        run_testbed(args, {k: parser.get_default(k) for k in vars(args)})
    else:
        parser.error("give --testbed or --combine")


if __name__ == "__main__":
    main()
