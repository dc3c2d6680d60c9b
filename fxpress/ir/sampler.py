"""`SamplerSpec`: a deterministic few-step sampler as data (timesteps, noise schedule, guidance), and its step.

A distilled student is only correct with the sampler it was trained for, so the artifact records this
spec and every consumer (the Python loop, the unrolled export, `fxpress bench quality`) runs the same
`ddim_step`. The arithmetic is diffusers' DDIM with eta 0 (`DDIMScheduler.step`), written on explicit
(timestep, previous timestep) pairs so that a student's grid need not be one of diffusers' spacings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fxpress.errors import FxpressError
from fxpress.ir.graph import output_tensors

PREDICTIONS = ("epsilon", "v_prediction")
GUIDANCE_MODES = ("cfg", "embedded", "none")


@dataclass(frozen=True)
class SamplerSpec:
    """A DDIM (eta 0) sampler: the timesteps the denoiser is called at, each step's previous timestep
    (-1: the end, whose alpha is `final_alpha_cumprod`), the schedule's cumulative alphas, what the
    denoiser predicts, whether x0 is clipped, and how guidance enters.

    `guidance`: "cfg" (two calls per step, conditional and unconditional, mixed with `guidance_scale`),
    "embedded" (one call taking the scale as the input `guidance_input`) or "none" (one conditional call).
    """

    timesteps: tuple[int, ...]
    prev_timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...]
    final_alpha_cumprod: float
    prediction: str = "epsilon"
    clip_sample: float | None = 1.0
    guidance: str = "cfg"
    guidance_scale: float = 1.5
    sample_input: str = "sample"
    timestep_input: str = "timestep"
    condition_input: str = "encoder_hidden_states"
    guidance_input: str = "guidance"
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def calls_per_step(self) -> int:
        """Network calls per step (CFG evaluates the denoiser twice, in one batch)."""
        return 2 if self.guidance == "cfg" else 1

    def check(self) -> None:
        """Raise FxpressError naming the field when the spec cannot describe a sampler."""
        n = len(self.alphas_cumprod)
        if not self.timesteps or len(self.prev_timesteps) != len(self.timesteps):
            raise FxpressError(f"sampler: need one previous timestep per timestep, got {len(self.timesteps)} "
                               f"timesteps and {len(self.prev_timesteps)} previous")
        for t, p in zip(self.timesteps, self.prev_timesteps):
            if not (0 <= t < n) or not (-1 <= p < t):
                raise FxpressError(f"sampler: step {t} -> {p} is not a step down inside [0, {n})")
        if self.prediction not in PREDICTIONS:
            raise FxpressError(f"sampler: prediction {self.prediction!r} is not one of {', '.join(PREDICTIONS)}")
        if self.guidance not in GUIDANCE_MODES:
            raise FxpressError(f"sampler: guidance {self.guidance!r} is not one of {', '.join(GUIDANCE_MODES)}")
        if not 0.0 < self.final_alpha_cumprod <= 1.0:
            raise FxpressError(f"sampler: final_alpha_cumprod {self.final_alpha_cumprod} is not in (0, 1]")

    def alpha(self, timestep: int) -> float:
        """Return the cumulative alpha at `timestep` (-1: the final alpha)."""
        return self.final_alpha_cumprod if timestep < 0 else self.alphas_cumprod[timestep]

    def with_timesteps(self, timesteps: list[int], **changes: Any) -> SamplerSpec:
        """Return this spec on another grid (each step going to the next listed timestep, the last to -1)."""
        ts = tuple(int(t) for t in timesteps)
        return SamplerSpec(**{**asdict(self), "timesteps": ts, "prev_timesteps": (*ts[1:], -1), **changes})

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (`from_json` reads it back)."""
        out = asdict(self)
        for key in ("timesteps", "prev_timesteps", "alphas_cumprod"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SamplerSpec:
        """Return the spec `to_json` wrote; raises FxpressError naming a missing or bad field."""
        if not isinstance(data, dict):
            raise FxpressError(f"sampler: expected a JSON object, got {type(data).__name__}")
        try:
            fields = {**data, **{k: tuple(data[k]) for k in ("timesteps", "prev_timesteps", "alphas_cumprod")}}
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise FxpressError(f"sampler: cannot read the recorded sampler: {exc}") from exc

    @classmethod
    def from_scheduler(cls, scheduler: Any, steps: int, **fields: Any) -> SamplerSpec:
        """Return the spec of diffusers' DDIM at `steps` steps under `scheduler`'s configuration (its
        timestep spacing, previous timestep t - T // steps, final alpha and clipping), so the spec's
        loop gives the same samples as `DDIMScheduler.step`."""
        from diffusers import DDIMScheduler

        if not isinstance(steps, int) or steps < 1:
            raise FxpressError(f"sampler: the step count must be a positive integer, got {steps!r}")
        ddim = DDIMScheduler.from_config(scheduler.config)
        ddim.set_timesteps(steps)
        ts = [int(t) for t in ddim.timesteps]
        stride = ddim.config.num_train_timesteps // steps
        prev = [t - stride if t - stride >= 0 else -1 for t in ts]
        clip = float(ddim.config.clip_sample_range) if ddim.config.clip_sample else None
        base = {"prediction": ddim.config.prediction_type, "clip_sample": clip,
                "notes": {"scheduler": "DDIMScheduler", "timestep_spacing": ddim.config.timestep_spacing}}
        return cls(tuple(ts), tuple(prev), tuple(float(a) for a in ddim.alphas_cumprod),
                   float(ddim.final_alpha_cumprod), **{**base, **fields})


def trailing_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Return `steps` timesteps spaced evenly from the last (`num_train_timesteps` - 1) downwards
    (diffusers' "trailing" spacing). For steps = 2^k the grids nest: halving keeps every other step."""
    stride = num_train_timesteps / steps
    return [int(round(num_train_timesteps - i * stride)) - 1 for i in range(steps)]


def predicted_x0(spec: SamplerSpec, x: torch.Tensor, out: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Return the clean sample the prediction `out` at cumulative alpha `alpha` implies (unclipped)."""
    a = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha, dtype=x.dtype)
    if spec.prediction == "epsilon":
        return (x - (1 - a).sqrt() * out) / a.sqrt()
    return a.sqrt() * x - (1 - a).sqrt() * out


def ddim_step(spec: SamplerSpec, x: torch.Tensor, out: torch.Tensor, alpha: float, alpha_prev: float) -> torch.Tensor:
    """Return x at the previous timestep after one DDIM (eta 0) step from cumulative alpha `alpha` to
    `alpha_prev`, given the denoiser's (guided) prediction `out`; the same arithmetic as diffusers'."""
    beta = 1 - alpha
    if spec.prediction == "epsilon":
        x0 = (x - beta ** 0.5 * out) / alpha ** 0.5
        eps = out
    else:
        x0 = alpha ** 0.5 * x - beta ** 0.5 * out
        eps = alpha ** 0.5 * out + beta ** 0.5 * x
    if spec.clip_sample is not None:
        x0 = x0.clamp(-spec.clip_sample, spec.clip_sample)
    return alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


def _first_tensor(output: Any) -> torch.Tensor:
    tensors = output_tensors(output)
    if not tensors:
        raise FxpressError(f"the denoiser returned {type(output).__name__}, not a tensor")
    return tensors[0]


def guided_output(spec: SamplerSpec, model: Any, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                  uncond: torch.Tensor | None = None, guidance: torch.Tensor | float | None = None) -> torch.Tensor:
    """Return the denoiser's prediction at `x`, timesteps `t` (B,) as the spec's guidance mode asks:
    CFG (one batch of [uncond; cond], mixed with `guidance` or the spec's scale), embedded (the scale as
    the input `spec.guidance_input`) or plain conditional."""
    w = spec.guidance_scale if guidance is None else guidance
    kw = {spec.sample_input: x, spec.timestep_input: t, spec.condition_input: cond}
    if spec.guidance == "none":
        return _first_tensor(model(**kw))
    if not isinstance(w, torch.Tensor):
        w = torch.full((x.shape[0],), float(w), dtype=x.dtype, device=x.device)
    elif w.numel() == 1:
        w = w.to(x.dtype).reshape(1).expand(x.shape[0])
    if spec.guidance == "embedded":
        return _first_tensor(model(**kw, **{spec.guidance_input: w}))
    if uncond is None:
        raise FxpressError("classifier-free guidance needs the unconditional embedding (uncond)")
    both = _first_tensor(model(**{spec.sample_input: torch.cat([x, x]), spec.timestep_input: torch.cat([t, t]),
                                 spec.condition_input: torch.cat([uncond.expand_as(cond), cond])}))
    u, c = both.chunk(2)
    return u + w.to(u.dtype).view(-1, *[1] * (u.dim() - 1)) * (c - u)


def sample(spec: SamplerSpec, model: Any, noise: torch.Tensor, cond: torch.Tensor,
           uncond: torch.Tensor | None = None, guidance: torch.Tensor | float | None = None) -> torch.Tensor:
    """Return the samples the spec's sampler draws from `noise` (not clamped beyond the spec's own x0
    clipping): one `guided_output` and one `ddim_step` per timestep."""
    x = noise
    for t, prev in zip(spec.timesteps, spec.prev_timesteps):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        out = guided_output(spec, model, x, tt, cond, uncond, guidance)
        x = ddim_step(spec, x, out, spec.alpha(t), spec.alpha(prev))
    return x
