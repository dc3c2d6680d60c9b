"""What reward fine-tuning (TextCraftor) needs from a testbed: its sampler, prompt sets, rewards, evaluation.

Prompts: every caption that names all of a testbed's factors (10 on digits, 192 on shapes), or all but
the ones a run leaves unsaid (32 on shapes without the colour), split by index: every third is held out
for evaluation, the rest train. The alignment reward's classifier is a second factor classifier trained
with its own seed; the testbed's committed classifier judges it, so the accuracy an evaluation reports is
never read by the model the reward tuned against.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fxpress.errors import FxpressError
from fxpress.ir.sampler import SamplerSpec, sample
from fxpress.testbed.classifier import FactorClassifier
from fxpress.testbed.models import Testbed
from fxpress.testbed.sampling import schedule, seeded_noise
from fxpress.training.prompt_set import PromptSet, encode_ids
from fxpress.training.rewards import STYLE_REWARDS, AlignmentReward, AngleReward, WeightedRewards, style_reward

HELD_OUT_EVERY = 3  # prompt i is held out when i % 3 == 2
ANGLE_STYLES = {"upright": 0.0, "tilted": 0.5}  # the rotation they ask for, as a share of its period
CLASSIFIER_REWARDS = ("alignment", *ANGLE_STYLES)  # the rewards read by the reward's own classifier


def sampler_spec(testbed: Testbed, steps: int | None = None) -> SamplerSpec:
    """Return the testbed's DDIM sampler (its steps, guidance weight, prediction and sample input)."""
    from diffusers import DDIMScheduler

    spec = testbed.spec
    scheduler = DDIMScheduler(**schedule(spec.prediction), clip_sample=True, set_alpha_to_one=False)
    return SamplerSpec.from_scheduler(scheduler, steps or spec.sample_steps, guidance_scale=spec.guidance,
                                      sample_input=spec.sample_input)


def all_prompts(testbed: Testbed, unsaid: Sequence[str] = ()) -> list[tuple[str, dict[str, int]]]:
    """Every caption naming all factors but those in `unsaid` (left for the sampler to choose, so a style
    reward may pick them: a palette where the colour is unsaid), with the factor values it asks for."""
    spec = testbed.spec
    unknown = sorted(set(unsaid) - set(spec.factors))
    if unknown:
        raise FxpressError(f"testbed {spec.name!r} has no factor {', '.join(map(repr, unknown))} to leave unsaid; "
                           f"its factors: {', '.join(spec.factors)}")
    names = [k for k in spec.factors if k not in unsaid]
    if unsaid and spec.describe is None:
        raise FxpressError(f"testbed {spec.name!r} cannot write captions that leave a factor unsaid")
    if not names:
        raise FxpressError(f"leaving every factor of testbed {spec.name!r} unsaid leaves no prompt to tune on")
    out = []
    for values in itertools.product(*(range(spec.factors[k]) for k in names)):
        factors = dict(zip(names, values))
        caption = spec.describe(factors) if spec.describe is not None else _caption(testbed, factors)
        out.append((caption, factors))
    return out


def _caption(testbed: Testbed, factors: dict[str, int]) -> str:
    known = dict((tuple(sorted(f.items())), c) for c, f in testbed.spec.prompts())
    key = tuple(sorted(factors.items()))
    if key not in known:
        raise FxpressError(f"testbed {testbed.spec.name!r} has no caption for {factors}")
    return known[key]


def prompt_split(testbed: Testbed, unsaid: Sequence[str] = ()) -> tuple[list[tuple[str, dict[str, int]]],
                                                                         list[tuple[str, dict[str, int]]]]:
    """Return (training prompts, held-out prompts) of `all_prompts(testbed, unsaid)`: every third is held out."""
    prompts = all_prompts(testbed, unsaid)
    train = [p for i, p in enumerate(prompts) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [p for i, p in enumerate(prompts) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return train, held


def prompt_set(testbed: Testbed, prompts: list[tuple[str, dict[str, int]]]) -> PromptSet:
    """Return the token ids, unconditional ids and targets of `prompts` (caption, factors)."""
    ids = testbed.tokenizer([c for c, _ in prompts])
    targets = {k: torch.tensor([f.get(k, -1) for _, f in prompts]) for k in testbed.spec.factors}
    return PromptSet(ids, testbed.tokenizer([""]), targets)


def style_names(testbed: Testbed) -> list[str]:
    """The style rewards that apply to the testbed's images (saturation and warmth need colour; ink, strokes
    on a dark ground, applies to single-channel images; upright / tilted need a rotation the classifier reads)."""
    kind_of_images = "colour" if testbed.spec.channels == 3 else "grey"
    pixel = [n for n, (kind, _) in STYLE_REWARDS.items() if kind.image_kind in ("any", kind_of_images)]
    return pixel + (list(ANGLE_STYLES) if "rotation" in testbed.spec.angles else [])


def reward_classifier(testbed: Testbed, seed: int = 1, steps: int | None = None,
                      path: str | Path | None = None) -> FactorClassifier:
    """Return the alignment reward's classifier: a factor classifier of its own `seed`, loaded from `path`
    when that file exists, else trained (the spec's classifier steps) and saved there."""
    from fxpress.testbed.train import train_classifier

    spec = testbed.spec
    torch.manual_seed(seed)
    model = FactorClassifier(spec.channels, spec.resolution, spec.factors, angles=spec.angles)
    if path is not None and Path(path).is_file():
        model.load_state_dict(load_file(str(path)))
    else:
        with torch.enable_grad():
            train_classifier(dataclasses.replace(testbed, classifier=model), steps or spec.train["classifier_steps"],
                             seed)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path).with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
            tmp.replace(path)
    return model.eval().requires_grad_(False)


def make_rewards(testbed: Testbed, weights: dict[str, float],
                 classifier: FactorClassifier | None = None) -> WeightedRewards:
    """Return the weighted rewards `weights` names ({'alignment': 1.0, 'bright': 0.5}); 'alignment', 'upright'
    and 'tilted' need the reward's `classifier` (`reward_classifier`) and are judged by the testbed's own."""
    usable = ["alignment", *style_names(testbed)]
    unknown = [n for n in weights if n not in usable]
    if unknown:
        raise FxpressError(f"testbed {testbed.spec.name!r} has no reward {', '.join(map(repr, unknown))}; its rewards: "
                           f"{', '.join(usable)}")
    chosen = {}
    spec = testbed.spec
    for name, weight in weights.items():
        if name in CLASSIFIER_REWARDS and classifier is None:
            raise FxpressError(f"the {name} reward needs its own classifier (fxpress.testbed.tuning."
                               "reward_classifier)")
        if name == "alignment":
            chosen[name] = (AlignmentReward(classifier, testbed.classifier), float(weight))
        elif name in ANGLE_STYLES:
            period = spec.angles["rotation"]
            defined = (lambda targets: spec.angle_defined("rotation", targets)) if spec.angle_defined else None
            chosen[name] = (AngleReward(name, classifier, testbed.classifier, "rotation", period,
                                        ANGLE_STYLES[name] * period, defined), float(weight))
        else:
            chosen[name] = (style_reward(name), float(weight))
    return WeightedRewards(chosen)


@torch.no_grad()
def generate(testbed: Testbed, prompts: PromptSet, per_prompt: int, seed: int = 0,
             spec: SamplerSpec | None = None, batch: int = 128) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return `per_prompt` samples of every prompt (fixed noise: image i from generator seed + i) and their
    targets, drawn with the testbed's sampler and its current text encoder."""
    spec = spec or sampler_spec(testbed)
    ids = prompts.input_ids.repeat_interleave(per_prompt, 0)
    targets = {k: v.repeat_interleave(per_prompt, 0) for k, v in prompts.targets.items()}
    shape = (testbed.spec.channels, testbed.spec.resolution, testbed.spec.resolution)
    noise = seeded_noise(len(ids), shape, seed)
    uncond = encode_ids(testbed.text_encoder, prompts.unconditional)
    out = []
    for lo in range(0, len(ids), batch):
        cond = encode_ids(testbed.text_encoder, ids[lo:lo + batch])
        out.append(sample(spec, testbed.denoiser, noise[lo:lo + batch], cond, uncond))
    return torch.cat(out).clamp(-1, 1), targets


@torch.no_grad()
def evaluate_tuning(testbed: Testbed, rewards: WeightedRewards, prompts: PromptSet, per_prompt: int,
                    seed: int = 0, images: torch.Tensor | None = None) -> dict[str, float]:
    """Return the mean of every reward and of its held-out evaluator ('<name>' and '<name>/eval') on
    fixed-seed samples of `prompts`, 'accuracy': the share of samples whose every named factor the
    testbed's classifier reads back, and for each factor some prompts leave unsaid '<factor> variety': the
    entropy in bits of the classifier's reading of it on those samples (a palette that collapses onto one
    colour reads 0)."""
    if images is None:
        images, targets = generate(testbed, prompts, per_prompt, seed)
    else:
        targets = {k: v.repeat_interleave(per_prompt, 0) for k, v in prompts.targets.items()}
    out = {name: float(v.mean()) for name, v in rewards.scores(images, targets).items()}
    out.update({f"{name}/eval": float(v.mean()) for name, v in rewards.evaluate(images, targets).items()})
    out["accuracy"] = sample_accuracy(testbed, images, targets)
    out.update(unsaid_variety(testbed, images, targets))
    return out


@torch.no_grad()
def unsaid_variety(testbed: Testbed, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """For each factor that some samples' prompts leave unsaid (target < 0): the entropy in bits of the
    testbed classifier's reading of it over those samples, as '<factor> variety'."""
    logits = testbed.classifier(images)
    out = {}
    for name, target in targets.items():
        unsaid = target < 0
        if not bool(unsaid.any()):
            continue
        counts = torch.bincount(logits[name][unsaid].argmax(-1), minlength=logits[name].shape[-1]).double()
        share = counts[counts > 0] / counts.sum()
        out[f"{name} variety"] = float(-(share * share.log2()).sum())
    return out


@torch.no_grad()
def sample_accuracy(testbed: Testbed, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> float:
    """The share of images whose every named factor (target ≥ 0) the testbed's classifier reads back."""
    logits = testbed.classifier(images)
    right = torch.ones(len(images), dtype=torch.bool)
    for name, target in targets.items():
        right &= (target < 0) | (logits[name].argmax(-1) == target)
    return float(right.float().mean())


__all__ = ["ANGLE_STYLES", "CLASSIFIER_REWARDS", "all_prompts", "evaluate_tuning", "generate", "make_rewards",
           "prompt_set", "prompt_split", "reward_classifier", "sample_accuracy", "sampler_spec", "style_names",
           "unsaid_variety"]
