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
from fxpress.testbed.models import Testbed, build_testbed, save_testbed
from fxpress.testbed.sampling import predict_noise, schedule, training_scheduler
from fxpress.testbed.specs import TestbedSpec, get_spec
from fxpress.training.diffusion_data import training_target
from fxpress.training.distributed import Distributed, unwrap
from fxpress.training.loop import EMA, step_generator, train_loop


class TextAndDenoiser(nn.Module):
    """Text encoder and denoiser as one module, so one DDP wrapper trains both."""

    def __init__(self, text_encoder: nn.Module, denoiser: nn.Module, sample_input: str):
        super().__init__()
        self.text_encoder, self.denoiser, self.sample_input = text_encoder, denoiser, sample_input

    def forward(self, noisy: torch.Tensor, timestep: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(ids).last_hidden_state
        return predict_noise(self.denoiser, noisy, timestep, hidden, self.sample_input)


def _shift(images: torch.Tensor, gen: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Randomly translate each image by up to `pixels` (edge padded)."""
    pad = F.pad(images, (pixels,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * pixels + 1, (images.shape[0], 2), generator=gen)
    h, w = images.shape[-2:]
    return torch.stack([pad[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def train_classifier(testbed: Testbed, steps: int, seed: int, batch: int = 128) -> float:
    """Train the factor classifier on the train split (light augmentation); return held-out accuracy."""
    spec = testbed.spec
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
        x = x + 0.05 * torch.randn(x.shape, generator=gen)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], train.factors[k][idx]) for k in spec.factors)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        logits = model(test.images)
    hits = torch.stack([logits[k].argmax(1) == test.factors[k] for k in spec.factors]).all(0)
    return float(hits.float().mean())


def train_denoiser(testbed: Testbed, ctx: Distributed, steps: int, batch: int, lr: float, ema_decay: float,
                   caption_dropout: float, seed: int, checkpoint_dir: Path | None = None,
                   checkpoint_every: int = 500, resume: bool = False) -> list[float]:
    """Train text encoder + denoiser on noise prediction with caption dropout; the EMA ends up in the testbed."""
    spec = testbed.spec
    train = spec.load_split("train")
    tokens = testbed.tokenizer(train.captions)
    empty = testbed.tokenizer([""])[0]
    scheduler = training_scheduler(spec.prediction)
    denoiser = TextAndDenoiser(testbed.text_encoder, testbed.denoiser, spec.sample_input).train()
    model = ctx.wrap(denoiser)  # on this rank's device (a GPU under torchrun with CUDA)
    ema = EMA(denoiser, ema_decay)  # averages live beside the parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.0)

    def loss_fn(step: int) -> torch.Tensor:
        gen = step_generator(seed, step)
        idx = torch.randint(0, len(train), (batch,), generator=gen)
        noise = torch.randn((batch, *train.images.shape[1:]), generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        ids = torch.where((torch.rand(batch, generator=gen) < caption_dropout)[:, None], empty, tokens[idx])
        x0, noise, t, ids = ctx.shard(train.images[idx]), ctx.shard(noise), ctx.shard(t), ctx.shard(ids)
        return F.mse_loss(model(scheduler.add_noise(x0, noise, t), t, ids), training_target(scheduler, x0, noise, t))

    losses = train_loop(loss_fn, optimizer, steps, ctx, {"denoiser": unwrap(model), "ema": ema},
                        after_step=lambda step: ema.update(unwrap(model), step), checkpoint_dir=checkpoint_dir,
                        checkpoint_every=checkpoint_every, resume=resume, description=f"training {spec.name}")
    ema.copy_to(denoiser)
    denoiser.eval()
    return losses


def train_testbed(spec: TestbedSpec, out: Path, ctx: Distributed, overrides: dict | None = None,
                  resume: bool = False, evaluate_quality: bool = True) -> dict:
    """Train every part of `spec`'s testbed, write weights + training.json to `out` (main rank); return the record.

    `overrides` replace entries of the spec's training config (steps, batch, classifier_steps, ...).
    """
    config = {**spec.train, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    seed = config["seed"]
    testbed = build_testbed(spec, seed)
    began = time.perf_counter()
    classifier_accuracy = train_classifier(testbed, config["classifier_steps"], seed)
    classifier_seconds = time.perf_counter() - began
    marker = out / "checkpoint" / "checkpoint.json"
    resumed_from = int(json.loads(marker.read_text())["step"]) if resume and marker.exists() else 0
    losses = train_denoiser(testbed, ctx, config["steps"], config["batch"], config["lr"], config["ema"],
                            config["caption_dropout"], seed, out / "checkpoint", resume=resume)
    record = {
        "testbed": spec.name, "train": config, "schedule": schedule(spec.prediction), "world_size": ctx.world,
        "device": str(ctx.device),
        "classifier_heldout_accuracy": classifier_accuracy, "classifier_seconds": round(classifier_seconds, 1),
        "denoiser_seconds": round(time.perf_counter() - began - classifier_seconds, 1),
        "resumed_from_step": resumed_from,  # denoiser_seconds and the losses count from here
        "final_loss_mean_last_100": sum(losses[-100:]) / max(len(losses[-100:]), 1),
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in testbed.parts().items()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": "python -m fxpress.testbed.train " + " ".join(sys.argv[1:]),
    }
    if ctx.is_main:
        for module in testbed.parts().values():
            module.to("cpu").eval().requires_grad_(False)
        if evaluate_quality:
            from fxpress.testbed.quality import evaluate

            record["quality"] = evaluate(testbed)[0].to_json()
        save_testbed(testbed, out, record)
    ctx.barrier()
    return record


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (works alone or under torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m fxpress.testbed.train", description=__doc__.split("\n")[0])
    parser.add_argument("testbed", help="digits, shapes or digits-dit")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=None, help="override the spec's denoiser steps")
    parser.add_argument("--batch", type=int, default=None, help="override the global batch")
    parser.add_argument("--classifier-steps", type=int, default=None, help="override the classifier's steps")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument("--no-quality", action="store_true", help="skip the quality evaluation at the end")
    args = parser.parse_args(argv)
    ctx = Distributed.from_env()
    try:
        overrides = {"steps": args.steps, "batch": args.batch, "classifier_steps": args.classifier_steps}
        record = train_testbed(get_spec(args.testbed), args.out, ctx, overrides, args.resume, not args.no_quality)
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
