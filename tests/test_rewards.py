"""Rewards for reward fine-tuning and the truncated-backprop sampler they train through."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from fxpress.errors import FxpressError
from fxpress.ir.sampler import SamplerSpec, sample
from fxpress.testbed.classifier import FactorClassifier
from fxpress.testbed.sampling import schedule
from fxpress.training.blend import blend_embeddings, blend_weights, blended_sample
from fxpress.training.reward_sampling import draw_grad_steps, truncated_sample
from fxpress.training.rewards import (
    AlignmentReward,
    AngleReward,
    Brightness,
    InkCoverage,
    Saturation,
    Warmth,
    WeightedRewards,
    foreground_mask,
    style_reward,
)


def square(value: tuple[float, ...], back: tuple[float, ...], size: int = 16, lo: int = 5, hi: int = 11):
    """One image (1, C, size, size) in [-1, 1]: a square of colour `value` on a background `back`."""
    image = torch.tensor(back).view(1, -1, 1, 1).expand(1, len(back), size, size).clone()
    image[:, :, lo:hi, lo:hi] = torch.tensor(value).view(1, -1, 1, 1)
    return image


def test_brightness_reward_and_its_evaluator_see_different_things():
    dim = square((0.0, 0.0, 0.0), (-0.8, -0.8, -0.8))
    lit_shape = square((0.8, 0.8, 0.8), (-0.8, -0.8, -0.8))
    lit_background = square((0.0, 0.0, 0.0), (-0.4, -0.4, -0.4))
    bright, dark = Brightness(1.0), Brightness(-1.0)
    assert bright(lit_shape) > bright(dim) and dark(lit_shape) < dark(dim)
    assert torch.allclose(bright(dim), -dark(dim))
    # washing out the background raises the reward but not the held-out evaluator (the shape's own value)
    assert bright(lit_background) > bright(dim)
    assert torch.allclose(bright.evaluate(lit_background), bright.evaluate(dim))
    assert bright.evaluate(lit_shape) > bright.evaluate(dim)
    image = dim.clone().requires_grad_(True)
    bright(image).sum().backward()
    assert image.grad is not None and (image.grad > 0).all()


def test_saturation_reward_prefers_colour_and_needs_colour_images():
    grey = square((0.5, 0.5, 0.5), (-0.8, -0.8, -0.8))
    red = square((0.9, -0.6, -0.6), (-0.8, -0.8, -0.8))
    vivid, muted = Saturation(1.0), Saturation(-1.0)
    assert vivid(red) > vivid(grey) + 0.5 and muted(red) < muted(grey)
    assert torch.allclose(vivid.evaluate(red), torch.tensor([0.75 / 0.95])) and vivid.evaluate(grey) < 0.05
    assert foreground_mask(red).sum() == 36
    with pytest.raises(FxpressError, match="colour"):
        vivid(torch.zeros(2, 1, 8, 8))


def test_warmth_reward_reads_red_against_blue_on_the_shape_only():
    back = (-0.84, -0.84, -0.84)
    red, yellow = square((0.8, -0.7, -0.8), back), square((0.9, 0.7, -0.8), back)
    blue, grey = square((-0.7, -0.4, 0.9), back), square((0.2, 0.2, 0.2), back)
    warm, cool = Warmth(1.0), Warmth(-1.0)
    scores = torch.cat([warm(x) for x in (red, yellow, blue, grey)])
    # the shape's red minus blue in [0, 1] units (0.8, 0.85, -0.8, 0), each scaled alike by the share of
    # the soft foreground weight that falls on the shape; the grey background's red minus blue is 0
    assert 0.5 < scores[0] < 0.8
    torch.testing.assert_close(scores / scores[0], torch.tensor([1.0, 0.85 / 0.8, -1.0, 0.0]), atol=0.01, rtol=0)
    torch.testing.assert_close(cool(red), -warm(red))
    # the evaluator is the HSV hue's closeness to orange: red (hue 3.75°) cos(26.25°), blue (228.75°) cos(198.75°)
    hues = torch.cat([warm.evaluate(x) for x in (red, blue)])
    torch.testing.assert_close(hues, torch.tensor([0.8969, -0.9469]), atol=1e-3, rtol=0)
    assert warm.evaluate(yellow) > 0.8 and warm.evaluate(grey).item() == 0.0  # grey: no hue to read
    image = red.clone().requires_grad_(True)
    warm(image).sum().backward()  # red up and blue down, on the shape; the background barely counts
    shape = image.grad[:, :, 5:11, 5:11]
    assert shape[:, 0].gt(0).all() and shape[:, 2].lt(0).all() and image.grad[:, 1].abs().sum() == 0
    assert image.grad[:, :, :5].abs().max() < 0.1 * shape[:, 0].min()
    with pytest.raises(FxpressError, match="colour"):
        warm(torch.zeros(2, 1, 8, 8))


def test_hue_matches_colorsys():
    import colorsys

    from fxpress.training.rewards import _hue

    pixels = torch.rand(3, 1, 64, generator=torch.Generator().manual_seed(0))
    ours = _hue(pixels[None])[0, 0]
    for i in range(64):
        r, g, b = (float(pixels[c, 0, i]) for c in range(3))
        expected = colorsys.rgb_to_hsv(r, g, b)[0] * 2 * torch.pi
        assert abs(torch.cos(ours[i]) - torch.cos(torch.tensor(expected))) < 1e-4
        assert abs(torch.sin(ours[i]) - torch.sin(torch.tensor(expected))) < 1e-4


def test_ink_evaluator_reads_stroke_width_in_pixels():
    thin, thick = torch.full((1, 1, 28, 28), -1.0), torch.full((1, 1, 28, 28), -1.0)
    thin[..., 4:24, 10:12] = 1.0   # a bar 2 pixels wide
    thick[..., 4:24, 10:16] = 1.0  # 6 pixels wide
    reward = InkCoverage(1.0)
    widths = torch.cat([reward.evaluate(thin), reward.evaluate(thick)])
    assert 1.5 < widths[0] < 3.0 and 4.5 < widths[1] < 7.5
    assert reward(thick) > reward(thin) and style_reward("thin")(thick) < style_reward("thin")(thin)
    assert reward.evaluate(torch.full((1, 1, 8, 8), -1.0)).item() == 0.0


def test_alignment_reward_is_the_log_probability_of_the_named_factors():
    torch.manual_seed(0)
    classifier = FactorClassifier(3, 16, {"shape": 4, "colour": 3})
    judge = FactorClassifier(3, 16, {"shape": 4, "colour": 3})
    reward = AlignmentReward(classifier, judge)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    targets = {"shape": torch.tensor([1, -1, -1]), "colour": torch.tensor([2, 0, -1])}
    logits = classifier(images)
    logp = {k: v.log_softmax(-1) for k, v in logits.items()}
    expected = torch.stack([(logp["shape"][0, 1] + logp["colour"][0, 2]) / 2, logp["colour"][1, 0],
                            torch.tensor(0.0)])
    assert torch.allclose(reward(images, targets), expected, atol=1e-6)
    judged = judge(images)
    hit0 = ((judged["shape"][0].argmax() == 1).float() + (judged["colour"][0].argmax() == 2).float()) / 2
    assert torch.allclose(reward.evaluate(images, targets)[0], hit0)
    assert reward.evaluate(images, targets)[2] == 1.0  # nothing asked, nothing missed
    with pytest.raises(FxpressError, match="second classifier"):
        AlignmentReward(classifier, classifier)
    with pytest.raises(FxpressError, match="no head"):
        reward(images, {"size": torch.zeros(3, dtype=torch.long)})


def test_angle_reward_reads_the_classifiers_angle_and_skips_rows_without_one():
    torch.manual_seed(0)
    classifier = FactorClassifier(3, 16, {"shape": 2}, angles={"rotation": 90.0})
    judge = FactorClassifier(3, 16, {"shape": 2}, angles={"rotation": 90.0})
    circle = 0
    defined = lambda targets: targets["shape"] != circle  # noqa: E731
    upright = AngleReward("upright", classifier, judge, "rotation", 90.0, 0.0, defined)
    tilted = AngleReward("tilted", classifier, judge, "rotation", 90.0, 45.0, defined)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    targets = {"shape": torch.tensor([1, 1, circle, 1])}
    vector = classifier.angle_vectors(classifier.features(images))["rotation"]
    cos = vector[:, 0] / vector.norm(dim=1)
    up = upright(images, targets)
    assert torch.allclose(up[[0, 1, 3]], cos[[0, 1, 3]], atol=1e-6) and up[2] == 0  # a circle scores 0
    assert torch.allclose(tilted(images, targets)[[0, 1, 3]], -cos[[0, 1, 3]], atol=1e-6)  # 45 degrees: opposite
    images.requires_grad_(True)
    upright(images, targets).sum().backward()
    assert images.grad.abs().sum() > 0  # differentiable in the images
    angle = judge.angles(images.detach())["rotation"]
    evaluated = upright.evaluate(images.detach(), targets)
    assert torch.allclose(evaluated[[0, 1, 3]], torch.cos(angle * (2 * torch.pi / 90))[[0, 1, 3]], atol=1e-5)
    assert evaluated[2] == 0
    with pytest.raises(FxpressError, match="second classifier"):
        AngleReward("upright", classifier, classifier, "rotation", 90.0, 0.0)
    with pytest.raises(FxpressError, match="no head"):
        AngleReward("upright", classifier, judge, "tilt", 90.0, 0.0)
    with pytest.raises(FxpressError, match="targets"):
        upright(images.detach())


def test_weighted_rewards_make_the_negative_weighted_sum():
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    rewards = WeightedRewards({"bright": (Brightness(1.0), 2.0), "vivid": (Saturation(1.0), 0.5)})
    loss, means = rewards.loss(images)
    expected = -(2.0 * Brightness(1.0)(images).mean() + 0.5 * Saturation(1.0)(images).mean())
    assert torch.allclose(loss, expected) and set(means) == {"bright", "vivid"}
    assert set(rewards.evaluate(images)) == {"bright", "vivid"}
    with pytest.raises(FxpressError, match="finite"):
        WeightedRewards({"bright": (Brightness(1.0), float("nan"))})
    with pytest.raises(FxpressError, match="unknown style reward"):
        style_reward("shiny")


def test_a_floored_reward_pulls_only_below_its_floor():
    images = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    level = float(Brightness(1.0)(images).mean().detach())
    plain = WeightedRewards({"bright": (Brightness(1.0), 2.0), "vivid": (Saturation(1.0), 0.5)})

    def loss_and_grad(rewards):
        images.grad = None
        loss, means = rewards.loss(images)
        loss.backward()
        return loss.detach(), images.grad.clone(), means

    vivid = loss_and_grad(WeightedRewards({"vivid": (Saturation(1.0), 0.5)}))
    above = loss_and_grad(plain.with_floors({"bright": level - 0.1}))  # above the floor: only vivid counts
    assert torch.allclose(above[0], vivid[0]) and torch.allclose(above[1], vivid[1])
    assert above[2]["bright"] == pytest.approx(level, abs=1e-6)  # still reported
    below = loss_and_grad(plain.with_floors({"bright": level + 0.1}))  # below: the hinge -2 (mean - floor)
    assert torch.allclose(below[0], vivid[0] - 2.0 * (level - (level + 0.1)), atol=1e-6)
    assert torch.allclose(below[1], loss_and_grad(plain)[1], atol=1e-7)
    assert plain.floors == {} and plain.with_floors({"bright": 0.0}).weights == plain.weights
    with pytest.raises(FxpressError, match="not among the rewards"):
        plain.with_floors({"dark": 0.0})
    with pytest.raises(FxpressError, match="finite"):
        WeightedRewards({"bright": (Brightness(1.0), 1.0)}, floors={"bright": float("inf")})


def _hinge_on_two_ranks(rank: int, store: str, results: str) -> None:
    """One of two gloo processes: its half of a batch of brightness 0.2 (rank 0) or 0.6 (rank 1)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        images = torch.full((2, 1, 4, 4), (0.2 if rank == 0 else 0.6) * 2 - 1, requires_grad=True)
        rewards = WeightedRewards({"bright": (Brightness(1.0), 2.0)})
        out = {}
        for floor in (0.3, 0.5):  # the whole batch's mean 0.4 is above 0.3 and below 0.5
            loss, _ = rewards.with_floors({"bright": floor}).loss(images)
            out[str(floor)] = float(loss)
        torch.save(out, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_under_torchrun_the_floor_compares_with_the_whole_batch(tmp_path):
    # rank 0 alone is below 0.3 and rank 1 alone above 0.5: a local decision would differ by rank
    torch.multiprocessing.spawn(_hinge_on_two_ranks, args=(str(tmp_path / "store"), str(tmp_path / "out")),
                                nprocs=2)
    for rank, level in ((0, 0.2), (1, 0.6)):
        out = torch.load(tmp_path / f"out.{rank}")
        assert out["0.3"] == 0.0  # above the floor on the whole batch: no pull on either rank
        assert out["0.5"] == pytest.approx(-2.0 * (level - 0.5), abs=1e-6)  # below: each rank's own hinge


class TinyDenoiser(nn.Module):
    """A denoiser whose prediction depends on the sample, the timestep and the condition's mean."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.cond = nn.Linear(8, 3)

    def forward(self, sample, timestep, encoder_hidden_states):
        shift = self.cond(encoder_hidden_states.mean(1))[:, :, None, None]
        return torch.tanh(self.conv(sample) + shift) * (timestep.float()[:, None, None, None] / 1000 + 0.5)


def spec(steps: int = 5) -> SamplerSpec:
    return SamplerSpec.from_scheduler(DDIMScheduler(**schedule(), clip_sample=True, set_alpha_to_one=False), steps,
                                      guidance_scale=2.0)


def test_truncated_sampling_draws_the_same_samples_and_only_late_steps_carry_gradients():
    model = TinyDenoiser().requires_grad_(False)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(2, 4, 8, requires_grad=True)
    uncond = torch.zeros(1, 4, 8)
    with torch.no_grad():
        plain = sample(spec(), model, noise, cond, uncond)
    for k in (None, 1, 3):
        assert torch.allclose(truncated_sample(spec(), model, noise, cond, uncond, grad_steps=k), plain, atol=1e-6)
    # K = 1 with the frozen embeddings given: the early steps use them, the last step the tuned ones
    frozen = torch.randn(2, 4, 8)
    mixed = truncated_sample(spec(), model, noise, cond, uncond, grad_steps=1, frozen_cond=frozen)
    s = spec()
    x = noise
    with torch.no_grad():
        for i, (t, prev) in enumerate(zip(s.timesteps, s.prev_timesteps)):
            x = sample(s.with_timesteps([t], prev_timesteps=(prev,)), model, x, cond if i == s.steps - 1 else frozen,
                       uncond)
    assert torch.allclose(mixed, x, atol=1e-6)
    # gradients: checkpointed equals plain, and more steps with gradients give a different gradient
    grads = {}
    for k, ckpt in ((1, True), (1, False), (None, True)):
        cond.grad = None
        truncated_sample(spec(), model, noise, cond, uncond, grad_steps=k, checkpoint=ckpt).square().sum().backward()
        grads[(k, ckpt)] = cond.grad.clone()
    assert grads[(1, True)].abs().sum() > 0
    assert torch.allclose(grads[(1, True)], grads[(1, False)], atol=1e-6)
    assert not torch.allclose(grads[(1, True)], grads[(None, True)], atol=1e-4)
    with pytest.raises(FxpressError, match="positive integer"):
        truncated_sample(spec(), model, noise, cond, uncond, grad_steps=0)
    gen = torch.Generator().manual_seed(0)
    drawn = {draw_grad_steps(gen, 3) for _ in range(50)}
    assert drawn == {1, 2, 3}


def test_weight_blend_interpolates_every_float_tensor_and_refuses_strangers():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    mid = blend_weights(a, b, 0.25)
    assert torch.allclose(mid.weight, 0.25 * a.weight + 0.75 * b.weight)
    assert torch.equal(blend_weights(a, b, 1.0).bias, a.bias) and torch.equal(blend_weights(a, b, 0.0).bias, b.bias)
    assert mid is not a and torch.equal(a.weight, a.weight.clone())
    with pytest.raises(FxpressError, match="shapes"):
        blend_weights(a, nn.Linear(5, 3), 0.5)
    with pytest.raises(FxpressError, match="one model only"):
        blend_weights(a, nn.Linear(4, 3, bias=False), 0.5)
    with pytest.raises(FxpressError, match="finite"):
        blend_weights(a, b, float("inf"))


def test_embedding_blend_while_sampling():
    model = TinyDenoiser().requires_grad_(False)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    tuned = (torch.randn(2, 4, 8), torch.randn(1, 4, 8))
    original = (torch.randn(2, 4, 8), torch.zeros(1, 4, 8))
    s = spec()
    with torch.no_grad():
        assert torch.allclose(blended_sample(s, model, noise, tuned, original, 1.0), sample(s, model, noise, *tuned))
        assert torch.allclose(blended_sample(s, model, noise, tuned, original, 0.0), sample(s, model, noise, *original))
        assert torch.allclose(blended_sample(s, model, noise, tuned, original, 1.0, last_steps=0),
                              sample(s, model, noise, *original))
        half = tuple(0.5 * t + 0.5 * o for t, o in zip(tuned, original))
        assert torch.allclose(blended_sample(s, model, noise, tuned, original, 0.5), sample(s, model, noise, *half),
                              atol=1e-6)
        # the tuned embeddings for the last 2 steps only: the original's first 3 steps, then the tuned ones
        early = sample(s.with_timesteps(list(s.timesteps[:3]), prev_timesteps=s.prev_timesteps[:3]), model, noise,
                       *original)
        late = sample(s.with_timesteps(list(s.timesteps[3:])), model, early, *tuned)
        assert torch.allclose(blended_sample(s, model, noise, tuned, original, 1.0, last_steps=2), late, atol=1e-6)
    with pytest.raises(FxpressError, match="last_steps"):
        blended_sample(s, model, noise, tuned, original, 1.0, last_steps=-1)
    assert torch.allclose(blend_embeddings(tuned[0], original[0], 0.3), 0.3 * tuned[0] + 0.7 * original[0],
                          atol=1e-6)
