"""Train a testbed from scratch, reproducibly: classifier first, then text encoder + denoiser jointly.

    python -m fxpress.testbed.train digits --out fxpress/testbed/weights/digits
    torchrun --nproc_per_node=2 -m fxpress.testbed.train digits --out DIR   # same result, DDP

Seeds, the full config and the measured quality go into DIR/training.json next to the weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fxpress.errors import FxpressError
from fxpress.testbed.classifier import angle_error, angle_to_vector
from fxpress.testbed.models import Testbed, build_testbed, load_testbed, save_testbed
from fxpress.testbed.sampling import predict_noise, schedule, training_scheduler
from fxpress.testbed.specs import TestbedSpec, get_spec
from fxpress.testbed.text import PAD
from fxpress.training.diffusion_data import training_target
from fxpress.training.distributed import Distributed, unwrap
from fxpress.training.loop import EMA, step_generator, train_loop


class TextAndDenoiser(nn.Module):
    """Text encoder and denoiser as one module, so one DDP wrapper trains both; with `factors`, linear
    heads also read every factor from the mean of the text encoder's hidden states over the caption's
    tokens (an auxiliary loss, see `train_denoiser`)."""

    def __init__(self, text_encoder: nn.Module, denoiser: nn.Module, sample_input: str,
                 factors: dict[str, int] | None = None, width: int = 0):
        super().__init__()
        self.text_encoder, self.denoiser, self.sample_input = text_encoder, denoiser, sample_input
        self.factor_heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in (factors or {}).items()})

    def forward(self, noisy: torch.Tensor, timestep: torch.Tensor, ids: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the denoiser's prediction and the factor heads' logits."""
        hidden = self.text_encoder(ids).last_hidden_state
        prediction = predict_noise(self.denoiser, noisy, timestep, hidden, self.sample_input)
        if not self.factor_heads:
            return prediction, {}
        used = (ids != PAD).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * used).sum(1) / used.sum(1)
        return prediction, {k: head(pooled) for k, head in self.factor_heads.items()}


def _shift(images: torch.Tensor, gen: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Randomly translate each image by up to `pixels` (edge padded)."""
    pad = F.pad(images, (pixels,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * pixels + 1, (images.shape[0], 2), generator=gen)
    h, w = images.shape[-2:]
    return torch.stack([pad[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def _angle_losses(testbed: Testbed, features: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of the angle heads' (cos, sin) where each angle is defined."""
    spec, total = testbed.spec, features.new_zeros(())
    for name, vector in testbed.classifier.angle_vectors(features).items():
        target = angle_to_vector(factors[name], spec.angles[name])
        defined = spec.angle_defined(name, factors) if spec.angle_defined else torch.ones(len(target), dtype=torch.bool)
        total = total + (vector - target)[defined].square().sum(1).mean()
    return total


@torch.no_grad()
def heldout_angle_errors(testbed: Testbed) -> dict[str, dict[str, float]]:
    """Return the classifier's mean and 90th-percentile absolute angle error (degrees) on the test split,
    over the images each angle is defined for."""
    spec, test = testbed.spec, testbed.spec.load_split("test")
    predicted = testbed.classifier.angles(test.images)
    out = {}
    for name, period in spec.angles.items():
        defined = spec.angle_defined(name, test.factors) if spec.angle_defined else slice(None)
        error = angle_error(predicted[name][defined], test.factors[name][defined], period)
        out[name] = {"mean": float(error.mean()), "p90": float(error.quantile(0.9)), "period": period}
    return out


def _relight(images: torch.Tensor, gen: torch.Generator, gain: tuple[float, float] = (0.7, 1.0),
             offset: tuple[float, float] = (-0.05, 0.3)) -> torch.Tensor:
    """Random global lighting per image: x * gain + offset (a haze or a dimming), clamped to [-1, 1]."""
    n = images.shape[0]
    g = gain[0] + (gain[1] - gain[0]) * torch.rand(n, 1, 1, 1, generator=gen)
    o = offset[0] + (offset[1] - offset[0]) * torch.rand(n, 1, 1, 1, generator=gen)
    return (images * g + o).clamp(-1, 1)


def train_classifier(testbed: Testbed, steps: int, seed: int, batch: int = 128) -> float:
    """Train the factor classifier (and its angle heads) on the train split with light augmentation (and,
    when the spec's training config sets `classifier_lighting`, random global lighting, so the judge reads
    identity and pose alike under a lighting shift); return the held-out accuracy (every categorical
    factor right)."""
    spec = testbed.spec
    relight = bool(spec.train.get("classifier_lighting", False))
    train, test = spec.load_split("train"), spec.load_split("test")
    model = testbed.classifier.train()
    optimizer = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    shift = 1 if "position" not in spec.factors else 0
    for step in range(steps):
        gen = step_generator(seed + 17, step)
        idx = torch.randint(0, len(train), (batch,), generator=gen)
        x = train.images[idx]
        if shift:
            x = _shift(x, gen, shift)
        if relight:
            x = _relight(x, gen)
        x = x + 0.05 * torch.randn(x.shape, generator=gen)
        features = model.features(x)
        factors = {k: v[idx] for k, v in train.factors.items()}
        loss = sum(F.cross_entropy(model.heads[k](features), factors[k]) for k in spec.factors)
        loss = loss + _angle_losses(testbed, features, factors)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        logits = model(test.images)
    hits = torch.stack([logits[k].argmax(1) == test.factors[k] for k in spec.factors]).all(0)
    return float(hits.float().mean())


def partial_captions(spec: TestbedSpec, factors: dict[str, torch.Tensor], index: torch.Tensor,
                     keep: torch.Tensor) -> list[str]:
    """Return the captions of images `index` naming only the factors `keep` (B, len(spec.factors)) marks."""
    return [spec.describe({name: int(factors[name][i]) if keep[row, col] else None
                           for col, name in enumerate(spec.factors)})
            for row, i in enumerate(index.tolist())]


def train_denoiser(testbed: Testbed, ctx: Distributed, steps: int, batch: int, lr: float, ema_decay: float,
                   caption_dropout: float, seed: int, checkpoint_dir: Path | None = None,
                   checkpoint_every: int = 500, resume: bool = False, factor_dropout: float = 0.0,
                   text_factor_loss: float = 0.0) -> list[float]:
    """Train text encoder + denoiser on noise prediction with caption dropout (and, where the spec can
    describe partial captions, each factor dropped with probability `factor_dropout`); the EMA ends up
    in the testbed.

    `text_factor_loss` weighs an auxiliary cross-entropy of linear heads reading each factor named in
    the caption from the mean of the text encoder's hidden states. Without it a jointly trained CLIP encoder let
    some words fade (the shapes testbed's position words: benchmarks/results/shapes_position.md).
    """
    spec = testbed.spec
    train = spec.load_split("train")
    tokens = testbed.tokenizer(train.captions)
    empty = testbed.tokenizer([""])[0]
    scheduler = training_scheduler(spec.prediction)
    factors = spec.factors if text_factor_loss > 0 else None
    denoiser = TextAndDenoiser(testbed.text_encoder, testbed.denoiser, spec.sample_input, factors,
                               spec.text_width).train()
    model = ctx.wrap(denoiser)  # on this rank's device (a GPU under torchrun with CUDA)
    ema = EMA(denoiser, ema_decay)  # averages live beside the parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.0)

    def loss_fn(step: int) -> torch.Tensor:
        gen = step_generator(seed, step)
        idx = torch.randint(0, len(train), (batch,), generator=gen)
        noise = torch.randn((batch, *train.images.shape[1:]), generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        ids, keep = tokens[idx], torch.ones(batch, len(spec.factors), dtype=torch.bool)
        if factor_dropout > 0 and spec.describe is not None:
            keep = torch.rand(batch, len(spec.factors), generator=gen) >= factor_dropout
            ids = testbed.tokenizer(partial_captions(spec, train.factors, idx, keep))
        dropped = torch.rand(batch, generator=gen) < caption_dropout
        ids = torch.where(dropped[:, None], empty, ids)
        x0, noise, t, ids = ctx.shard(train.images[idx]), ctx.shard(noise), ctx.shard(t), ctx.shard(ids)
        prediction, logits = model(scheduler.add_noise(x0, noise, t), t, ids)
        loss = F.mse_loss(prediction, training_target(scheduler, x0, noise, t))
        for col, (name, value) in enumerate(logits.items()):  # named factors only; -100 is ignored
            labels = torch.where(keep[:, col] & ~dropped, train.factors[name][idx], -100)
            loss = loss + text_factor_loss * F.cross_entropy(value, ctx.shard(labels)) / len(logits)
        return loss

    losses = train_loop(loss_fn, optimizer, steps, ctx, {"denoiser": unwrap(model), "ema": ema},
                        after_step=lambda step: ema.update(unwrap(model), step), checkpoint_dir=checkpoint_dir,
                        checkpoint_every=checkpoint_every, resume=resume, description=f"training {spec.name}")
    ema.copy_to(denoiser)
    denoiser.eval()
    return losses


def train_testbed(spec: TestbedSpec, out: Path, ctx: Distributed, overrides: dict | None = None,
                  resume: bool = False, evaluate_quality: bool = True, init_from: Path | None = None) -> dict:
    """Train every part of `spec`'s testbed, write weights + training.json to `out` (main rank); return the record.

    `overrides` replace entries of the spec's training config (steps, batch, lr, classifier_steps, ...).
    `init_from` names a saved testbed to continue from: its text encoder and denoiser are trained `steps`
    more with a fresh optimizer, and its classifier is kept as it is.
    """
    config = {**spec.train, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    seed = config["seed"]
    previous: dict = {}
    began = time.perf_counter()
    if init_from is not None:
        testbed = load_testbed(spec.name, init_from)
        previous = testbed.record
        for module in testbed.parts().values():
            module.train().requires_grad_(True)
        testbed.classifier.eval().requires_grad_(False)
        classifier_accuracy = previous["classifier_heldout_accuracy"]
        seed = seed + 1 + previous["train"]["steps"]  # fresh batches, not a replay of the first run's
    else:
        testbed = build_testbed(spec, seed)
        classifier_accuracy = train_classifier(testbed, config["classifier_steps"], seed)
    classifier_seconds = time.perf_counter() - began
    marker = out / "checkpoint" / "checkpoint.json"
    resumed_from = int(json.loads(marker.read_text())["step"]) if resume and marker.exists() else 0
    losses = train_denoiser(testbed, ctx, config["steps"], config["batch"], config["lr"], config["ema"],
                            config["caption_dropout"], seed, out / "checkpoint", resume=resume,
                            factor_dropout=config.get("factor_dropout", 0.0),
                            text_factor_loss=config.get("text_factor_loss", 0.0))
    record = {
        "testbed": spec.name, "train": config, "schedule": schedule(spec.prediction), "world_size": ctx.world,
        "device": str(ctx.device),
        "classifier_heldout_accuracy": classifier_accuracy,
        "classifier_heldout_angle_error_deg": heldout_angle_errors(testbed),
        "classifier_seconds": round(classifier_seconds, 1),
        "denoiser_seconds": round(time.perf_counter() - began - classifier_seconds, 1),
        "resumed_from_step": resumed_from,  # denoiser_seconds and the losses count from here
        "final_loss_mean_last_100": sum(losses[-100:]) / max(len(losses[-100:]), 1),
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in testbed.parts().items()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": "python -m fxpress.testbed.train " + " ".join(sys.argv[1:]),
    }
    if init_from is not None:  # the classifier and the earlier steps come from there
        earlier = previous.get("continued_from", {}).get("commands", [])
        record["continued_from"] = {"path": str(init_from), "train": previous["train"],
                                    "commands": earlier + [previous.get("command")]}
        record["train"] = {**config, "total_steps": previous["train"].get("total_steps", previous["train"]["steps"])
                           + config["steps"]}
        record["classifier_seconds"] = previous.get("classifier_seconds")
        if "classifier_command" in previous:
            record["classifier_command"] = previous["classifier_command"]
    if ctx.is_main:
        for module in testbed.parts().values():
            module.to("cpu").eval().requires_grad_(False)
        if evaluate_quality:
            from fxpress.testbed.quality import evaluate

            record["quality"] = evaluate(testbed)[0].to_json()
        save_testbed(testbed, out, record)
    ctx.barrier()
    return record


def retrain_classifier(spec: TestbedSpec, out: Path, overrides: dict | None = None) -> dict:
    """Train the classifier of the testbed saved in `out` again (its denoiser and text encoder untouched),
    measure the samples again with it, and update the weights and training.json there."""
    from fxpress.testbed.models import load_testbed
    from fxpress.testbed.quality import evaluate

    testbed = load_testbed(spec.name, out)
    config = {**testbed.record.get("train", spec.train), **spec.train,
              **{k: v for k, v in (overrides or {}).items() if v is not None}}
    fresh = build_testbed(spec, config["seed"]).classifier  # the same seeded start as a full run
    testbed.classifier = fresh
    began = time.perf_counter()
    accuracy = train_classifier(testbed, config["classifier_steps"], config["seed"])
    record = {**testbed.record, "train": {**testbed.record.get("train", {}), **{k: config[k] for k in config
                                                                              if k.startswith("classifier")}},
              "classifier_heldout_accuracy": accuracy,
              "classifier_heldout_angle_error_deg": heldout_angle_errors(testbed),
              "classifier_seconds": round(time.perf_counter() - began, 1),
              "classifier_command": "python -m fxpress.testbed.train " + " ".join(sys.argv[1:])}
    testbed.classifier.eval().requires_grad_(False)
    record["quality"] = evaluate(testbed)[0].to_json()
    save_testbed(testbed, out, record)
    return record


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (works alone or under torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m fxpress.testbed.train", description=__doc__.split("\n")[0])
    parser.add_argument("testbed", help="digits, shapes or digits-dit")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=None, help="override the spec's denoiser steps")
    parser.add_argument("--batch", type=int, default=None, help="override the global batch")
    parser.add_argument("--classifier-steps", type=int, default=None, help="override the classifier's steps")
    parser.add_argument("--lr", type=float, default=None, help="override the denoiser's learning rate")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue training the saved testbed there (fresh optimizer, its classifier kept)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument("--no-quality", action="store_true", help="skip the quality evaluation at the end")
    parser.add_argument("--classifier-only", action="store_true",
                        help="train only the classifier of the testbed in OUT again and re-measure its samples")
    args = parser.parse_args(argv)
    if args.classifier_only:
        try:
            record = retrain_classifier(get_spec(args.testbed), args.out, {"classifier_steps": args.classifier_steps})
        except FxpressError as exc:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        print({k: v for k, v in record.items() if k in ("quality", "classifier_heldout_accuracy",
                                                         "classifier_heldout_angle_error_deg")})
        return 0
    ctx = Distributed.from_env()
    try:
        overrides = {"steps": args.steps, "batch": args.batch, "classifier_steps": args.classifier_steps,
                     "lr": args.lr}
        record = train_testbed(get_spec(args.testbed), args.out, ctx, overrides, args.resume, not args.no_quality,
                               args.init_from)
    except FxpressError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        ctx.close()
    if ctx.is_main:
        print({k: v for k, v in record.items() if k in ("quality", "classifier_heldout_accuracy",
                                                         "final_loss_mean_last_100")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
