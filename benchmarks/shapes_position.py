"""Diagnosis: why the shapes testbed ignored the position words, one measurement per hypothesis.

Hypotheses and how each is measured (results in benchmarks/results/shapes_position.md):

  text   the text encoder does not separate the position words: relative L2 distance of the hidden
         states of two captions that differ in one word (position word vs shape word)
  where  nothing tells the cross-attention where a pixel is: a linear probe reads the pixel's half of
         the image (top/bottom, left/right) from the features entering each cross-attention, at high noise
  when   the loss weighting: the fraction of training timesteps at which the quadrant can no longer be
         read from x_t itself (a linear probe on the noisy pixels), i.e. where only the text can decide it
  train  short trainings of each candidate fix from the same seed and steps, sampled on the evaluation
         prompts with fixed seeds (per-factor sample accuracy by the committed classifier)

Run: .venv/bin/python benchmarks/shapes_position.py [--steps 800 --batch 32 --variants ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("FXPRESS_QUIET", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fxpress.testbed import shapes  # noqa: E402
from fxpress.testbed.classifier import FactorClassifier  # noqa: E402
from fxpress.testbed.dataset import ImageSet  # noqa: E402
from fxpress.testbed.models import Testbed, build_testbed, load_testbed, weights_dir  # noqa: E402
from fxpress.testbed.quality import evaluate  # noqa: E402
from fxpress.testbed.sampling import training_scheduler  # noqa: E402
from fxpress.testbed.specs import SHAPES, TestbedSpec, _unet  # noqa: E402
from fxpress.testbed.train import train_denoiser  # noqa: E402
from fxpress.training.distributed import Distributed  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PAIRS = [("top left", "bottom left"), ("top left", "top right"), ("circle", "square"), ("red", "blue")]


def text_separation(testbed: Testbed) -> dict[str, float]:
    """Relative L2 distance between the hidden states of captions differing in one word."""
    out = {}
    for a, b in PAIRS:
        base = testbed.spec.describe({"shape": 0, "colour": 0, "size": 1, "position": 0})
        h = testbed.encode([base, base.replace(a, b)])
        out[f"{a} vs {b}"] = float((h[0] - h[1]).norm() / h[0].norm())
    return out


def _halves_probe(features: torch.Tensor, train: int) -> tuple[float, float]:
    """Least-squares probe of each token's own row half and column half from its features (N, HW, C)."""
    n, hw, c = features.shape
    side = int(round(hw ** 0.5))
    x = torch.cat([features.reshape(-1, c), torch.ones(n * hw, 1)], 1).double()
    token = torch.arange(hw).repeat(n)
    split = train * hw
    accuracies = []
    for label in ((token // side) >= side // 2, (token % side) >= side // 2):
        w = torch.linalg.lstsq(x[:split], (label[:split].double() * 2 - 1)[:, None]).solution
        accuracies.append(float(((x[split:] @ w)[:, 0] > 0).eq(label[split:]).float().mean()))
    return accuracies[0], accuracies[1]


@torch.no_grad()
def where_probe(testbed: Testbed, timestep: int = 900, count: int = 600, train: int = 500) -> dict[str, list[float]]:
    """Probe accuracy (row half, column half) of the features entering every cross-attention at `timestep`."""
    features: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: features.__setitem__(name, i[0]))
             for name, module in testbed.denoiser.named_modules() if name.endswith("attn2")]
    images = testbed.spec.load_split("test")
    scheduler = training_scheduler(testbed.spec.prediction)
    t = torch.full((count,), timestep)
    noise = torch.randn(images.images[:count].shape, generator=torch.Generator().manual_seed(0))
    testbed.denoiser(sample=scheduler.add_noise(images.images[:count], noise, t), timestep=t,
                     encoder_hidden_states=testbed.encode(images.captions[:count]))
    for hook in hooks:
        hook.remove()
    return {name: [round(a, 3) for a in _halves_probe(f, train)] for name, f in features.items()}


def when_probe(steps: tuple[int, ...] = (500, 700, 800, 850, 900, 950, 999), count: int = 3000) -> dict[int, float]:
    """Accuracy of a probe (linear in the 4x4 cell means and their squares) reading the quadrant from x_t alone."""
    data = shapes.make_shapes(count, 5)
    scheduler = training_scheduler()
    train = count * 5 // 6
    target = torch.nn.functional.one_hot(data.factors["position"], 4).double() * 2 - 1
    out = {}
    for t in steps:
        noise = torch.randn(data.images.shape, generator=torch.Generator().manual_seed(t))
        noisy = scheduler.add_noise(data.images, noise, torch.full((count,), t))
        pooled = torch.nn.functional.avg_pool2d(noisy, 8).flatten(1)  # 4x4 cells: few features, no overfitting
        x = torch.cat([pooled, pooled.square(), torch.ones(count, 1)], 1).double()
        w = torch.linalg.lstsq(x[:train], target[:train]).solution
        out[t] = float(((x[train:] @ w).argmax(1) == data.factors["position"][train:]).float().mean())
    return out


class WordEmbeddings(torch.nn.Module):
    """A text encoder without layers: every word its own trained vector (no mixing between words)."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)

    def forward(self, ids: torch.Tensor):
        return type("Out", (), {"last_hidden_state": self.embed(ids)})()


VARIANTS = {
    # name: (model config, text encoder: "joint" (CLIP trained with the denoiser), "frozen" (CLIP left
    # random), "words" (no layers), "aux" (joint, plus the factor loss), position words first in the caption?)
    "3 levels, joint text (committed)": (SHAPES.model, "joint", False),
    "3 levels, frozen random text": (SHAPES.model, "frozen", False),
    "3 levels, word embeddings": (SHAPES.model, "words", False),
    "4 levels (4x4 bottom), joint text": (_unet(3, shapes.SIZE, (32, 48, 64, 64), 16, attention=2), "joint", False),
    "3 levels, joint text, position first": (SHAPES.model, "joint", True),
    "3 levels, joint text + factor loss": (SHAPES.model, "aux", False),
}


def _split(position_first: bool):
    def load(split: str) -> ImageSet:
        images = shapes.load_shapes_split(split)
        captions = [shapes.describe({k: int(images.factors[k][i]) for k in shapes.FACTORS}, position_first)
                    for i in range(len(images))]
        return ImageSet(images.images, images.factors, captions)
    return load


def train_variant(name: str, steps: int, batch: int, seed: int, classifier: torch.nn.Module) -> dict:
    """Train one variant from scratch for `steps` and measure it."""
    model, text, position_first = VARIANTS[name]
    spec: TestbedSpec = dataclasses.replace(SHAPES, model=model, load_split=_split(position_first),
                                            describe=lambda f: shapes.describe(f, position_first),
                                            prompts=lambda: [(shapes.describe(f, position_first), f)
                                                             for _, f in SHAPES.prompts()])
    testbed = build_testbed(spec, seed)
    testbed.classifier = classifier
    if text == "frozen":
        testbed.text_encoder.requires_grad_(False)
    elif text == "words":
        testbed.text_encoder = WordEmbeddings(testbed.tokenizer.vocab_size, spec.text_width)
    began = time.perf_counter()
    config = spec.train
    losses = train_denoiser(testbed, Distributed.from_env(), steps, batch, config["lr"], config["ema"],
                            config["caption_dropout"], seed, text_factor_loss=1.0 if text == "aux" else 0.0)
    seconds = time.perf_counter() - began
    testbed.text_encoder.eval().requires_grad_(False)
    testbed.denoiser.eval().requires_grad_(False)
    quality, _ = evaluate(testbed, per_prompt=10)
    return {"variant": name, "steps": steps, "batch": batch, "seed": seed, "seconds": round(seconds, 1),
            "params": sum(p.numel() for p in testbed.denoiser.parameters()),
            "loss_last_100": sum(losses[-100:]) / len(losses[-100:]), "factor_accuracy": quality.factor_accuracy,
            "accuracy": quality.accuracy, "text": text_separation(testbed), "where": where_probe(testbed)}


def write_markdown(record: dict, path: Path) -> None:
    """Render the record as the results table."""
    committed = record["committed"]
    lines = ["# Why the shapes testbed ignored position, and the fix", "",
             "Run: `python benchmarks/shapes_position.py` (its docstring says what each measurement is); raw "
             "numbers in `shapes_position.json`.", "",
             "## text: relative L2 distance of the text encoder's hidden states, captions differing in one word", "",
             "| model | " + " | ".join(committed["text"]) + " |", "|---" * (len(committed["text"]) + 1) + "|",
             "| committed (3 levels, joint CLIP) | "
             + " | ".join(f"{v:.3f}" for v in committed["text"].values()) + " |"]
    for name, run in record.get("runs", {}).items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in run["text"].values()) + " |")
    lines += ["", "## where: probe accuracy of a pixel's row half / column half from the features entering each "
              "cross-attention (t = 900; chance 0.5)", "", "| model | layer | row | column |", "|---|---|---|---|"]
    runs = record.get("runs", {})
    for name, where in [("committed", committed["where"])] + [(n, r["where"]) for n, r in runs.items()]:
        for layer, (row, col) in where.items():
            lines.append(f"| {name} | {layer.replace('.transformer_blocks.0.attn2', '')} | {row:.3f} | {col:.3f} |")
    lines += ["", "## when: quadrant read from the noisy image x_t alone (probe on 4x4 cell means; chance 0.25)", "",
              "| t | " + " | ".join(record["when"]) + " |", "|---" * (len(record["when"]) + 1) + "|",
              "| accuracy | " + " | ".join(f"{v:.3f}" for v in record["when"].values()) + " |", "",
              "## train: short trainings from the same seed (sample accuracy, committed classifier, 10 per prompt)", "",
              "| variant | steps x batch | shape | colour | size | position | all | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    quality = committed["quality"]["factor_accuracy"]
    lines.append("| committed weights (3 levels, joint CLIP, position last) | 3000 x 64 | " + " | ".join(
        f"{quality[k]:.3f}" for k in ("shape", "colour", "size", "position"))
        + f" | {committed['quality']['accuracy']:.3f} | (GPU) |")
    for name, run in record.get("runs", {}).items():
        f = run["factor_accuracy"]
        lines.append(f"| {name} | {run['steps']} x {run['batch']} | " + " | ".join(
            f"{f[k]:.3f}" for k in ("shape", "colour", "size", "position"))
            + f" | {run['accuracy']:.3f} | {run['seconds']} |")
    path.write_text("\n".join(lines) + "\n" + record.get("notes", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "shapes_position.json")
    args = parser.parse_args()
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    if "committed" not in record:  # the weights committed before this diagnosis (3 levels, joint text)
        committed = load_testbed("shapes")
        record["committed"] = {"text": text_separation(committed), "where": where_probe(committed),
                               "quality": committed.record.get("quality")}
    if "when" not in record:
        record["when"] = when_probe()
    print(json.dumps({k: record[k] for k in ("committed", "when")}, indent=1), flush=True)
    judge = FactorClassifier(SHAPES.channels, SHAPES.resolution, SHAPES.factors)  # the committed classifier
    judge.load_state_dict(load_file(str(weights_dir("shapes") / "classifier.safetensors")), strict=False)
    runs = record.setdefault("runs", {})
    for name in args.variants:
        runs[f"{name} / {args.steps} steps"] = train_variant(name, args.steps, args.batch, args.seed,
                                                               judge.eval())
        print(json.dumps(runs[f"{name} / {args.steps} steps"], indent=1), flush=True)
        args.out.write_text(json.dumps(record, indent=1))
    args.out.write_text(json.dumps(record, indent=1))
    write_markdown(record, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
