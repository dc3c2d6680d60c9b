"""`fxpress tune` (reward fine-tuning, TextCraftor) and `fxpress blend` (weight-space interpolation of tuned models)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from pathlib import Path

from rich.console import Console

from fxpress.errors import FxpressError, RecipeError


def add_tune_parsers(sub, console: Console) -> None:
    """Register the `tune` and `blend` subcommands."""
    t = sub.add_parser("tune", help="reward fine-tuning of a testbed's text encoder (or denoiser) through its "
                                    "sampler; writes a pipeline folder")
    t.add_argument("model", help="testbed zoo model (testbed-digits-unet, ...), testbed name, or a folder written by "
                                 "`fxpress tune` / `fxpress blend`")
    t.add_argument("--reward", action="append", required=True, metavar="NAME=WEIGHT",
                   help="a reward and its weight (repeatable): alignment, bright, dark, vivid, muted, warm, cool "
                        "(colour), thick, thin (strokes), upright, tilted (a rotation the classifier reads)")
    t.add_argument("--keep", action="append", default=[], metavar="NAME",
                   help="hold a reward (one of --reward's) as a constraint: it pulls only while a batch falls below "
                        "the starting model's level, measured before training (repeatable; e.g. --keep alignment)")
    t.add_argument("--leave-unsaid", action="append", default=[], metavar="FACTOR",
                   help="prompts leave this factor unsaid, so the sampler (and a style reward) chooses it: "
                        "--leave-unsaid colour with --reward warm=1 tunes a palette (repeatable)")
    t.add_argument("--keep-samples", type=int, default=256,
                   help="samples of the training prompts that measure the kept rewards' floors")
    t.add_argument("--target", default="encoder", choices=("encoder", "denoiser", "encoder+denoiser"),
                   help="what trains: the text encoder (TextCraftor), the denoiser, or the encoder then the denoiser")
    t.add_argument("--grad-steps", default="5", metavar="K",
                   help="sampler steps with gradients, the last K (or 'all')")
    t.add_argument("--random-truncation", action="store_true", help="draw K from 1..K per update (AlignProp)")
    t.add_argument("--no-checkpointing", action="store_true",
                   help="keep every step's activations instead of recomputing them in the backward pass")
    t.add_argument("--steps", type=int, default=100, help="updates per stage")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--ema", type=float, default=None, help="EMA decay of the trained weights (default: off)")
    t.add_argument("--drift-limit", type=float, default=None, metavar="D",
                   help="encoder stage: a trust region; past a relative distance D (0.15: 15%%) between the tuned "
                        "and the original embeddings a penalty pulls back (default: off)")
    t.add_argument("--drift-weight", type=float, default=100.0, help="the trust region penalty's weight")
    t.add_argument("--lora-rank", type=int, default=0,
                   help="denoiser stage: train a LoRA of this rank (folded in when written) instead of every weight")
    t.add_argument("--eval-per-prompt", type=int, default=8,
                   help="samples per held-out prompt in the before/after table (0: skip the table)")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the checkpoints beside --out (OUT.checkpoints)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="pipeline folder to write")
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=lambda args: run_tune(args, console))

    b = sub.add_parser("blend", help="interpolate two tuned models of one testbed in weight space: W*A + (1-W)*B")
    b.add_argument("a", help="folder written by `fxpress tune` (or a testbed name: the original)")
    b.add_argument("b", help="folder written by `fxpress tune` (or a testbed name: the original)")
    b.add_argument("--weight", type=float, required=True, help="W: 1 gives A, 0 gives B")
    b.add_argument("--out", required=True, help="pipeline folder to write")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=lambda args: run_blend(args, console))


def open_testbed(model: str):
    """Return the testbed `model` names: a tuned folder, a testbed zoo model or a testbed name."""
    from fxpress.frontends.zoo import ZOO
    from fxpress.testbed.models import load_testbed
    from fxpress.testbed.specs import TESTBEDS
    from fxpress.testbed.tuned_folder import is_tuned_folder, load_tuned

    if is_tuned_folder(model):
        return load_tuned(model)
    name = getattr(ZOO.get(model), "testbed", None) or (model if model in TESTBEDS else None)
    if name is None:
        zoo = sorted(n for n, e in ZOO.items() if hasattr(e, "testbed"))
        raise FxpressError(f"{model!r} is not a testbed model: give a testbed zoo name ({', '.join(zoo)}), a testbed "
                           f"({', '.join(TESTBEDS)}) or a folder written by `fxpress tune` or `fxpress blend`")
    return load_testbed(name)


def _grad_steps(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise RecipeError(f"--grad-steps takes a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise RecipeError(f"--grad-steps takes a positive integer or 'all', got {text!r}")
    return value


def tune_recipe(args: argparse.Namespace):
    """Return the validated TuneRecipe the `tune` flags describe."""
    from fxpress.passes.reward.finetune import RewardConfig
    from fxpress.tune import TuneRecipe, parse_rewards

    config = RewardConfig(steps=args.steps, batch=args.batch, lr=args.lr, grad_steps=_grad_steps(args.grad_steps),
                          random_truncation=args.random_truncation, checkpoint=not args.no_checkpointing,
                          ema=args.ema, seed=args.seed, drift_limit=args.drift_limit, drift_weight=args.drift_weight)
    return TuneRecipe(rewards=parse_rewards(args.reward), target=args.target, train=config,
                      lora_rank=args.lora_rank, keep=tuple(args.keep), keep_samples=args.keep_samples).validate()


def run_tune(args: argparse.Namespace, console: Console) -> int:
    """Tune as `args` say and write the folder; raises an FxpressError subclass on bad input."""
    from fxpress.testbed.tuned_folder import check_tuned_out, save_tuned
    from fxpress.testbed.tuning import (
        CLASSIFIER_REWARDS,
        evaluate_tuning,
        make_rewards,
        prompt_set,
        prompt_split,
        reward_classifier,
    )
    from fxpress.tune import tune

    check_tuned_out(args.out, args.overwrite)
    recipe = tune_recipe(args)
    if args.eval_per_prompt < 0:
        raise RecipeError(f"--eval-per-prompt must be 0 or more, got {args.eval_per_prompt}")
    testbed = open_testbed(args.model)
    train_prompts, held = prompt_split(testbed, args.leave_unsaid)  # refused before any training
    classifier = None
    if any(name in CLASSIFIER_REWARDS for name, _ in recipe.rewards):
        saved = Path(args.model) / "reward_classifier.safetensors"
        if saved.is_file():
            classifier = reward_classifier(testbed, path=saved)
        else:
            console.print("training the rewards' own classifier (seed 1; the testbed's classifier judges it)")
            classifier = reward_classifier(testbed)
    rewards = make_rewards(testbed, dict(recipe.rewards), classifier)
    held_set = prompt_set(testbed, held)
    per_prompt = args.eval_per_prompt
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only the first process reports and writes
    before = evaluate_tuning(testbed, rewards, held_set, per_prompt) if per_prompt and main_rank else None
    checkpoints = Path(f"{args.out}.checkpoints")
    if args.resume and not checkpoints.is_dir():
        raise FxpressError(f"--resume: no checkpoints at {checkpoints} (a run with the same --out writes them)")
    start = time.perf_counter()
    result = tune(testbed, recipe, classifier=classifier, prompts=prompt_set(testbed, train_prompts),
                  checkpoint_dir=checkpoints, resume=args.resume)
    if not main_rank:
        return 0
    after = evaluate_tuning(result.testbed, rewards, held_set, per_prompt) if per_prompt else None
    record = {"tuned_from": args.model, "testbed": testbed.spec.name, "rewards": dict(recipe.rewards),
              "target": recipe.target, "settings": dataclasses.asdict(recipe.train), "lora_rank": recipe.lora_rank,
              "unsaid": list(args.leave_unsaid),
              "floors": result.reports[0]["floors"],
              "stages": result.reports, "held_out": {"prompts": len(held), "per_prompt": per_prompt,
                                                     "before": before, "after": after},
              "previous": getattr(testbed, "record", None) if Path(args.model).is_dir() else None}
    extra = {"reward_classifier": classifier.state_dict()} if classifier is not None else None
    save_tuned(result.testbed, args.out, record, overwrite=args.overwrite, extra=extra)
    shutil.rmtree(checkpoints, ignore_errors=True)
    for report in result.reports:
        console.print(f"{report['stage']}: {report['steps']} updates in {report['seconds']:.0f} s, "
                      f"{report['trained_params']:,} weights trained, K = {report['grad_steps'] or 'all'}")
        if report.get("drift_last_batch") is not None:
            limit = report["drift_limit"]
            console.print(f"  the tuned embeddings sit {report['drift_last_batch']:.1%} from the original's (last "
                          f"batch; {'limit ' + format(limit, '.1%') if limit is not None else 'no limit'})")
    for name, floor in result.reports[0]["floors"].items():
        console.print(f"kept {name} at or above {floor:.4f} (the starting model's level on the training prompts)")
    if before is not None:
        console.print(f"held-out prompts ({len(held)} x {per_prompt} samples, fixed seeds): before -> after")
        for key in before:
            console.print(f"  {key:18s} {before[key]:8.4f} -> {after[key]:8.4f}")
    console.print(f"tuned in {time.perf_counter() - start:.0f} s; wrote {args.out} (text_encoder/ and the denoiser "
                  f"as model folders: `fxpress compress "
                  f"{args.out} --component text_encoder` compresses the tuned encoder)")
    return 0


def run_blend(args: argparse.Namespace, console: Console) -> int:
    """Blend two tuned models of one testbed in weight space and write the folder."""
    import torch

    from fxpress.testbed.tuned_folder import check_tuned_out, save_tuned
    from fxpress.training.blend import blend_weights

    check_tuned_out(args.out, args.overwrite)
    a, b = open_testbed(args.a), open_testbed(args.b)
    if a.spec.name != b.spec.name:
        raise FxpressError(f"cannot blend models of different testbeds: {args.a} is {a.spec.name!r}, {args.b} is "
                           f"{b.spec.name!r}")
    changed = []
    for part in ("text_encoder", "denoiser"):
        first, second = getattr(a, part), getattr(b, part)
        if any(not torch.equal(x, y) for x, y in zip(first.state_dict().values(), second.state_dict().values())):
            changed.append(part)
        setattr(a, part, blend_weights(first, second, args.weight).eval())
    save_tuned(a, args.out, {"blend": {"a": args.a, "b": args.b, "weight": args.weight, "parts_differing": changed},
                             "testbed": a.spec.name}, overwrite=args.overwrite)
    console.print(f"blended {', '.join(changed) or 'nothing (the two models are equal)'} at {args.weight:g} x "
                  f"{args.a} + {1 - args.weight:g} x {args.b}; wrote {args.out}")
    return 0
