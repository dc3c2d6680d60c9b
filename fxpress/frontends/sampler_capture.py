"""An N-step deterministic sampler unrolled into one program: (noise, cond[, uncond][, guidance]) -> image.

`UnrolledSampler` holds the denoiser once (and optionally the text encoder) and runs the spec's DDIM
steps (`ir.sampler.ddim_step`) with the schedule's alphas as Python floats, so `torch.export` writes
one graph whose N denoiser calls share one set of weights, with the step arithmetic as constants.
`sample_loop` is the same loop in plain Python: the reference and what benchmarks time.

The output is the last step's x clamped to [-clip_sample, clip_sample] when the spec clips (as the
testbed's `sample_images` clamps after diffusers' loop; `DDIMScheduler.step` clips only x0 inside each
step, so its last `prev_sample` may lie slightly outside), else the last x unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from fxpress.errors import CaptureError
from fxpress.ir.graph import output_tensors
from fxpress.ir.sampler import SamplerSpec, sample

INPUT_NAMES = ("noise", "cond", "uncond", "guidance")


def _accepted_keywords(module: nn.Module) -> set[str] | None:
    """The keywords `module.forward` takes, or None when it takes **kwargs (anything)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}


def check_sampler_inputs(denoiser: nn.Module, spec: SamplerSpec, noise: Any, cond: Any, uncond: Any = None,
                         guidance: Any = None, token_ids: bool = False) -> None:
    """Raise CaptureError saying which input (or denoiser keyword) does not fit `spec`'s sampler."""
    if not isinstance(denoiser, nn.Module):
        raise CaptureError(f"sampler: the denoiser must be a torch.nn.Module, got {type(denoiser).__name__}")
    if not isinstance(spec, SamplerSpec):
        raise CaptureError(f"sampler: expected a SamplerSpec, got {type(spec).__name__}")
    names = [spec.sample_input, spec.timestep_input, spec.condition_input]
    if spec.guidance == "embedded":
        names.append(spec.guidance_input)
    accepted = _accepted_keywords(denoiser)
    missing = [n for n in names if accepted is not None and n not in accepted]
    if missing:
        raise CaptureError(f"sampler: {type(denoiser).__name__}.forward takes no keyword {missing[0]!r} "
                           f"(guidance {spec.guidance!r} calls it with {', '.join(names)}); set the spec's "
                           "input names or wrap the denoiser")
    for name, value, required in (("noise", noise, True), ("cond", cond, True), ("uncond", uncond, False),
                                  ("guidance", guidance, False)):
        if value is None and not required:
            continue
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"sampler: input {name!r} must be a tensor, got {type(value).__name__}")
    if not noise.is_floating_point() or noise.dim() < 2:
        raise CaptureError(f"sampler: input 'noise' must be a float tensor (batch, ...), got {noise.dtype} "
                           f"of shape {tuple(noise.shape)}")
    what = "token ids (an integer tensor)" if token_ids else "embeddings (a float tensor)"
    for name, value in (("cond", cond), ("uncond", uncond)):
        if value is not None and value.is_floating_point() == token_ids:
            raise CaptureError(f"sampler: input {name!r} must be {what}, got {value.dtype}")
    if cond.shape[0] != noise.shape[0]:
        raise CaptureError(f"sampler: 'cond' has batch {cond.shape[0]} but 'noise' has {noise.shape[0]}")
    if spec.guidance == "cfg" and uncond is None:
        raise CaptureError("sampler: guidance 'cfg' needs 'uncond' (the unconditional embeddings or token ids)")
    if spec.guidance != "cfg" and uncond is not None:
        raise CaptureError(f"sampler: guidance {spec.guidance!r} takes no 'uncond' (only 'cfg' does)")
    if uncond is not None and (uncond.shape[0] not in (1, cond.shape[0]) or uncond.shape[1:] != cond.shape[1:]):
        raise CaptureError(f"sampler: 'uncond' of shape {tuple(uncond.shape)} does not fit 'cond' of shape "
                           f"{tuple(cond.shape)} (batch 1 or the same batch)")
    if guidance is not None:
        if spec.guidance == "none":
            raise CaptureError("sampler: guidance 'none' takes no 'guidance' input")
        if not guidance.is_floating_point() or guidance.numel() not in (1, noise.shape[0]):
            raise CaptureError(f"sampler: 'guidance' must be a float tensor of 1 or {noise.shape[0]} scales, "
                               f"got {guidance.dtype} of shape {tuple(guidance.shape)}")


def sample_loop(denoiser: nn.Module, spec: SamplerSpec, noise: torch.Tensor, cond: torch.Tensor,
                uncond: torch.Tensor | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
    """Return the image `spec`'s sampler draws from `noise` given embeddings `cond` (and `uncond` for CFG;
    `guidance`: a tensor of scales, else the spec's), clamped to the clip range when the spec clips.

    Raises CaptureError naming an input that does not fit the spec.
    """
    check_sampler_inputs(denoiser, spec, noise, cond, uncond, guidance)
    x = sample(spec, denoiser, noise, cond, uncond, guidance)
    if spec.clip_sample is not None:
        x = x.clamp(-spec.clip_sample, spec.clip_sample)
    return x


def encode_text(text_encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Return the text encoder's hidden states for token `ids` (`last_hidden_state`, else its first tensor)."""
    out = text_encoder(ids)
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if isinstance(hidden, torch.Tensor) else output_tensors(out)[0]


class UnrolledSampler(nn.Module):
    """`spec`'s N steps as one module: forward(noise, cond, uncond=None, guidance=None) -> image.

    The denoiser (and the optional text encoder, which makes cond/uncond token ids) is held once.
    """

    def __init__(self, denoiser: nn.Module, spec: SamplerSpec, text_encoder: nn.Module | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.text_encoder = text_encoder
        self.spec = spec

    def forward(self, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        if self.text_encoder is not None:
            check_sampler_inputs(self.denoiser, self.spec, noise, cond, uncond, guidance, token_ids=True)
            if uncond is not None:   # both prompts through the encoder in one call
                hidden = encode_text(self.text_encoder, torch.cat([uncond.expand_as(cond), cond]))
                uncond, cond = hidden.chunk(2)
            else:
                cond = encode_text(self.text_encoder, cond)
        return sample_loop(self.denoiser, self.spec, noise, cond, uncond, guidance)


def sampler_inputs(example_batch: Any) -> dict[str, torch.Tensor]:
    """Return the named sampler inputs of a tuple (noise, cond[, uncond][, guidance]) or a dict of them."""
    if isinstance(example_batch, dict):
        unknown = sorted(set(example_batch) - set(INPUT_NAMES))
        if unknown:
            raise CaptureError(f"sampler: unknown input {unknown[0]!r}; the inputs are {', '.join(INPUT_NAMES)}")
        named = dict(example_batch)
    elif isinstance(example_batch, (tuple, list)):
        if not 2 <= len(example_batch) <= len(INPUT_NAMES):
            raise CaptureError(f"sampler: expected (noise, cond[, uncond][, guidance]), got {len(example_batch)} "
                               "inputs")
        named = dict(zip(INPUT_NAMES, example_batch))
    else:
        raise CaptureError(f"sampler: example_batch must be a tuple or dict of tensors, got "
                           f"{type(example_batch).__name__}")
    if "noise" not in named or "cond" not in named:
        raise CaptureError("sampler: example_batch needs at least 'noise' and 'cond'")
    return {k: v for k, v in named.items() if v is not None}


def sampler_call(named: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Return (args, kwargs) calling the sampler with `named` inputs: positional up to the first absent one,
    then keywords (so the exported program is called as it was exported)."""
    args: list[torch.Tensor] = []
    for name in INPUT_NAMES:
        if name not in named:
            break
        args.append(named[name])
    return tuple(args), {k: v for k, v in named.items() if k not in INPUT_NAMES[:len(args)]}


def capture_sampler(denoiser: nn.Module, spec: SamplerSpec, example_batch: Any,
                    text_encoder: nn.Module | None = None) -> torch.export.ExportedProgram:
    """Return the unrolled sampler exported (non-strict) on `example_batch` ((noise, cond[, uncond][, guidance])
    or a dict of them; token ids for cond/uncond when `text_encoder` is given).

    Raises CaptureError for inputs that do not fit the spec, a denoiser lacking a keyword the spec calls
    it with, or an export failure.
    """
    named = sampler_inputs(example_batch)
    check_sampler_inputs(denoiser, spec, named["noise"], named["cond"], named.get("uncond"), named.get("guidance"),
                         token_ids=text_encoder is not None)
    sampler = UnrolledSampler(denoiser, spec, text_encoder).eval()
    args, kwargs = sampler_call(named)
    try:
        with torch.no_grad():
            return torch.export.export(sampler, args, kwargs, strict=False)
    except CaptureError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many types; all mean "not capturable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"could not capture the {spec.steps}-step sampler around {type(denoiser).__name__}: "
                           f"{type(exc).__name__}: {first}. Check that the denoiser alone captures "
                           "(fxpress.capture) with these input shapes") from exc
