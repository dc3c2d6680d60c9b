"""Testbed quality metrics: sample accuracy, Fréchet distance on classifier features, denoising MSE.

Samples are drawn for every evaluation prompt from fixed seeds, so two models (say FP32 and 1.99-bit)
are compared on the same starting noise. The Fréchet distance is measured against held-out real
images that neither the diffusion model nor the classifier was trained on.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from fxpress.ir.sampler import SamplerSpec
from fxpress.testbed.models import Testbed
from fxpress.testbed.sampling import predict_noise, sample_images, sample_with, training_scheduler


@dataclass
class Quality:
    """Measured quality of one model on one testbed."""

    accuracy: float
    factor_accuracy: dict[str, float]
    frechet: float
    denoise_mse: float
    samples: int
    seconds: float
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """Return a JSON-ready dict."""
        return asdict(self)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Return the Fréchet distance between Gaussians fitted to feature rows `a` and `b`.

    tr(sqrt(S_a S_b)) is computed as the trace of sqrt(A S_b A) with A = sqrt(S_a) (symmetric, PSD).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    cross = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


@torch.no_grad()
def classify(testbed: Testbed, images: torch.Tensor, batch: int = 500) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Return (predicted factor values, features) of images in [-1, 1]."""
    preds: dict[str, list[torch.Tensor]] = {}
    feats = []
    for lo in range(0, images.shape[0], batch):
        x = images[lo:lo + batch]
        f = testbed.classifier.features(x)
        feats.append(f.numpy())
        for name, head in testbed.classifier.heads.items():
            preds.setdefault(name, []).append(head(f).argmax(1))
    return {k: torch.cat(v) for k, v in preds.items()}, np.concatenate(feats)


@torch.no_grad()
def denoising_mse(testbed: Testbed, model: nn.Module, images: torch.Tensor, captions: list[str], seed: int = 0,
                  batch: int = 250) -> float:
    """Return the mean noise-prediction MSE on held-out images at seeded timesteps and noise (a velocity
    model's prediction is turned into the noise it implies, so both kinds are measured alike)."""
    scheduler = training_scheduler(testbed.spec.prediction)
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],), generator=gen)
    noise = torch.randn(images.shape, generator=gen)
    total = 0.0
    for lo in range(0, images.shape[0], batch):
        sl = slice(lo, lo + batch)
        noisy = scheduler.add_noise(images[sl], noise[sl], t[sl])
        eps = predict_noise(model, noisy, t[sl], testbed.encode(captions[sl]), testbed.spec.sample_input)
        if testbed.spec.prediction == "v_prediction":  # eps = sqrt(a) v + sqrt(1 - a) x_t
            alpha = scheduler.alphas_cumprod[t[sl]].view(-1, *[1] * (noisy.dim() - 1))
            eps = alpha.sqrt() * eps + (1 - alpha).sqrt() * noisy
        total += float((eps - noise[sl]).square().sum())
    return total / noise.numel()


@torch.no_grad()
def evaluate(testbed: Testbed, model: nn.Module | None = None, *, per_prompt: int = 30, seed: int = 0,
             steps: int | None = None, guidance: float | None = None,
             sampler: SamplerSpec | None = None) -> tuple[Quality, torch.Tensor]:
    """Sample `per_prompt` images for every evaluation prompt from `model` (default: the testbed's own
    denoiser) and measure them.

    `sampler` (a distilled model's own) replaces the testbed's DDIM; `denoise_mse` is then left out (NaN):
    a student trained for its few timesteps is not a noise predictor at every timestep.
    Returns (Quality, images) with images ordered prompt by prompt, (P * per_prompt, C, H, W).
    """
    start = time.perf_counter()
    spec = testbed.spec
    model = testbed.denoiser if model is None else model
    steps, guidance = steps or spec.sample_steps, spec.guidance if guidance is None else guidance
    prompts = spec.prompts()
    captions = [text for text, _ in prompts for _ in range(per_prompt)]
    cond = testbed.encode(captions)
    uncond = testbed.encode([""])
    shape = (spec.channels, spec.resolution, spec.resolution)
    if sampler is not None:
        images = sample_with(sampler, model, cond, uncond, shape, seed=seed)
    else:
        images = sample_images(model, cond, uncond, shape, steps=steps, guidance=guidance, seed=seed,
                               sample_input=spec.sample_input, prediction=spec.prediction)
    predicted, features = classify(testbed, images)
    wanted = {name: torch.tensor([f[name] for _, f in prompts for _ in range(per_prompt)]) for name in spec.factors}
    hits = {name: predicted[name] == wanted[name] for name in spec.factors}
    every = torch.stack(list(hits.values())).all(0)
    heldout = spec.load_split("test")
    _, real_features = classify(testbed, heldout.images)
    quality = Quality(
        accuracy=float(every.float().mean()),
        factor_accuracy={k: float(v.float().mean()) for k, v in hits.items()},
        frechet=frechet_distance(features, real_features),
        denoise_mse=denoising_mse(testbed, model, heldout.images, heldout.captions, seed) if sampler is None
        else float("nan"),
        samples=len(captions), seconds=time.perf_counter() - start,
        settings={"steps": steps, "guidance": guidance, "seed": seed, "per_prompt": per_prompt,
                  "sampler": "DDIM (eta 0)", "heldout": len(heldout)} if sampler is None else
        {"steps": sampler.steps, "guidance": sampler.guidance_scale, "seed": seed, "per_prompt": per_prompt,
         "sampler": f"DDIM (eta 0) at {list(sampler.timesteps)}, guidance {sampler.guidance}",
         "heldout": len(heldout)},
    )
    return quality, images
