"""RewardFinetune: the text encoder alone moves, and the reward it is tuned on rises."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

import fxpress
from fxpress.errors import PassError, RecipeError
from fxpress.ir.sampler import SamplerSpec, sample
from fxpress.passes.context import PassContext
from fxpress.passes.pipeline import Pipeline
from fxpress.passes.reward.finetune import PromptSet, RewardConfig, RewardFinetune
from fxpress.passes.reward.levels import reward_levels
from fxpress.testbed.sampling import schedule
from fxpress.training.prompt_set import encode_ids
from fxpress.training.rewards import Brightness, WeightedRewards
from fxpress.training.trust_region import relative_drift

WIDTH, LENGTH = 16, 4


class TinyDenoiser(nn.Module):
    """Predicts noise from the sample and the mean of the text hidden states."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.cond = nn.Linear(WIDTH, 3)

    def forward(self, sample, timestep, encoder_hidden_states):
        return torch.tanh(self.conv(sample)) + self.cond(encoder_hidden_states.mean(1))[:, :, None, None]


def encoder() -> CLIPTextModel:
    torch.manual_seed(1)
    config = CLIPTextConfig(vocab_size=8, hidden_size=WIDTH, intermediate_size=32, projection_dim=WIDTH,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=LENGTH,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return CLIPTextModel(config).eval()


def setup():
    ids = torch.tensor([[1, 3, 2, 0], [1, 4, 2, 0], [1, 5, 6, 2], [1, 7, 2, 0]])
    prompts = PromptSet(ids, torch.tensor([[1, 2, 0, 0]]), {"word": torch.tensor([0, 1, 2, 3])})
    spec = SamplerSpec.from_scheduler(DDIMScheduler(**schedule(), clip_sample=True, set_alpha_to_one=False), 3,
                                      guidance_scale=2.0)
    graph = fxpress.capture(encoder(), (ids[:2],))
    return graph, prompts, spec, TinyDenoiser().eval()


def brightness(text: nn.Module, denoiser: nn.Module, prompts: PromptSet, spec: SamplerSpec) -> float:
    noise = torch.randn(len(prompts), 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        images = sample(spec, denoiser, noise, encode_ids(text, prompts.input_ids),
                        encode_ids(text, prompts.unconditional))
    return float(Brightness(1.0)(images).mean())


def test_reward_finetune_moves_only_the_encoder_and_raises_the_reward():
    graph, prompts, spec, denoiser = setup()
    before = {k: v.clone() for k, v in graph.module.state_dict().items()}
    denoiser_before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    rewards = WeightedRewards({"bright": (Brightness(1.0), 1.0)})
    tune = RewardFinetune(rewards, spec, (3, 8, 8), RewardConfig(steps=12, batch=4, lr=3e-3, grad_steps=2, ema=0.5))
    context = PassContext(components={"denoiser": denoiser, "prompts": prompts})
    tuned, report = Pipeline([tune]).run(graph, context)
    assert all(torch.equal(v, denoiser_before[k]) for k, v in denoiser.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in graph.module.state_dict().items())  # the input stays
    moved = [k for k, v in tuned.module.state_dict().items() if not torch.equal(v, before[k])]
    assert moved, "the encoder did not train"
    original = brightness(graph.module, denoiser, prompts, spec)
    assert brightness(tuned.module, denoiser, prompts, spec) > original + 0.01
    details = report.passes[0].details
    assert details["grad_steps"] == 2 and set(details["rewards_last_batch"]) == {"bright"}


def test_a_drift_limit_keeps_the_tuned_embeddings_near_the_original_and_the_reward_still_rises():
    graph, prompts, spec, denoiser = setup()
    rewards = WeightedRewards({"bright": (Brightness(1.0), 1.0)})
    ids = torch.cat([prompts.input_ids, prompts.unconditional])
    original = encode_ids(graph.module, ids)

    def run(limit):
        config = RewardConfig(steps=12, batch=4, lr=3e-3, grad_steps=2, drift_limit=limit)
        tuned, report = Pipeline([RewardFinetune(rewards, spec, (3, 8, 8), config)]).run(
            graph, PassContext(components={"denoiser": denoiser, "prompts": prompts}))
        with torch.no_grad():
            distance = float(relative_drift(encode_ids(tuned.module, ids), original).sqrt())
        return distance, report.passes[0].details, brightness(tuned.module, denoiser, prompts, spec)

    free, bounded = run(None), run(0.3)
    print(f"relative distance: free {free[0]:.3f}, limit 0.3 {bounded[0]:.3f}; brightness {free[2]:.3f}, "
          f"{bounded[2]:.3f}")
    assert free[0] > 1.0 and bounded[0] < 0.4  # the walk is held near the limit, not at 1.3
    assert bounded[2] > brightness(graph.module, denoiser, prompts, spec) + 0.05  # and still moves the reward
    assert bounded[1]["drift_limit"] == 0.3 and 0.2 < bounded[1]["drift_last_batch"] < 0.4
    assert free[1]["drift_limit"] is None and free[1]["drift_last_batch"] > 1.0


def test_reward_levels_average_each_reward_over_the_prompts_in_turn():
    graph, prompts, spec, denoiser = setup()
    rewards = WeightedRewards({"bright": (Brightness(1.0), 1.0)})
    noise = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        images = sample(spec, denoiser, noise, encode_ids(graph.module, prompts.input_ids[[0, 1, 2, 3, 0, 1]]),
                        encode_ids(graph.module, prompts.unconditional))
    expected = float(Brightness(1.0)(images).mean())
    for batch in (4, 6):
        got = reward_levels(rewards, spec, graph.module, denoiser, prompts, (3, 8, 8), samples=6, seed=3, batch=batch)
        assert got["bright"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(RecipeError, match="samples"):
        reward_levels(rewards, spec, graph.module, denoiser, prompts, (3, 8, 8), samples=0)


def test_a_kept_reward_holds_its_floor_while_another_pulls_against_it():
    graph, prompts, spec, denoiser = setup()
    dark = {"dark": (Brightness(-1.0), 1.0)}
    original = brightness(graph.module, denoiser, prompts, spec)

    def tuned_brightness(rewards: WeightedRewards) -> float:
        tune = RewardFinetune(rewards, spec, (3, 8, 8), RewardConfig(steps=12, batch=4, lr=3e-3, grad_steps=2))
        tuned, _ = Pipeline([tune]).run(graph, PassContext(components={"denoiser": denoiser, "prompts": prompts}))
        return brightness(tuned.module, denoiser, prompts, spec)

    free = tuned_brightness(WeightedRewards(dark))
    level = reward_levels(WeightedRewards({"bright": (Brightness(1.0), 1.0)}), spec, graph.module, denoiser,
                          prompts, (3, 8, 8), samples=64)["bright"]
    kept = tuned_brightness(WeightedRewards({**dark, "bright": (Brightness(1.0), 3.0)}, floors={"bright": level}))
    print(f"brightness: original {original:.4f}, dark alone {free:.4f}, dark with bright kept {kept:.4f}")
    assert free < original - 0.02
    assert abs(kept - original) < 0.25 * (original - free)


def test_reward_finetune_says_what_is_missing_or_wrong():
    graph, prompts, spec, denoiser = setup()
    rewards = WeightedRewards({"bright": (Brightness(1.0), 1.0)})
    tune = RewardFinetune(rewards, spec, (3, 8, 8), RewardConfig(steps=1, batch=2))
    with pytest.raises(PassError, match="denoiser"):
        Pipeline([tune]).run(graph, PassContext(components={"prompts": prompts}))
    with pytest.raises(PassError, match="PromptSet"):
        Pipeline([tune]).run(graph, PassContext(components={"denoiser": denoiser}))
    with pytest.raises(RecipeError, match="grad_steps"):
        RewardConfig(grad_steps=0).validate()
    for bad in ({"drift_limit": -0.1}, {"drift_limit": float("nan")}, {"drift_weight": 0.0}):
        with pytest.raises(RecipeError, match="drift_"):
            RewardConfig(**bad).validate()
    with pytest.raises(RecipeError, match="frozen encoder"):
        RewardFinetune(rewards, spec, (3, 8, 8), RewardConfig(drift_limit=0.1), target="denoiser")
    last_only = RewardFinetune(rewards, spec, (3, 8, 8), RewardConfig(steps=1, batch=2, grad_steps=1))
    with pytest.raises(PassError, match="no gradient would reach"):  # DDIM's last step from t = 0 is the identity
        Pipeline([last_only]).run(graph, PassContext(components={"denoiser": denoiser, "prompts": prompts}))
    with pytest.raises(RecipeError, match="unconditional"):
        PromptSet(prompts.input_ids, torch.ones(2, LENGTH, dtype=torch.long))


def test_reward_finetune_of_a_denoiser_lora_moves_only_the_branch_and_raises_the_reward():
    from fxpress.passes.rewire.fuse import merged_state_dict
    from fxpress.passes.rewire.lora import InsertLoRA

    _, prompts, spec, denoiser = setup()
    text = encoder()
    example = {"sample": torch.randn(2, 3, 8, 8), "timestep": torch.tensor([500, 900]),
               "encoder_hidden_states": encode_ids(text, prompts.input_ids[:2])}
    graph = fxpress.capture(denoiser, (), example)
    rewards = WeightedRewards({"bright": (Brightness(1.0), 1.0)})
    passes = [InsertLoRA(["conv", "cond"], rank=2, name="reward"),
              RewardFinetune(rewards, spec, (3, 8, 8), RewardConfig(steps=12, batch=4, lr=3e-2, grad_steps=2),
                             target="denoiser", branches=("reward",))]
    text_before = {k: v.clone() for k, v in text.state_dict().items()}
    tuned, report = Pipeline(passes).run(graph, PassContext(components={"text_encoder": text, "prompts": prompts}))
    assert all(torch.equal(v, text_before[k]) for k, v in text.state_dict().items())
    moved = {k for k, v in tuned.module.state_dict().items() if k in graph.module.state_dict()
             and not torch.equal(v, graph.module.state_dict()[k])}
    assert moved == set(), "only the LoRA factors may move"
    # conv: A 3->2 channels (3x3), B 2->3 (1x1); cond: A 16->2, B 2->3
    assert report.passes[-1].details["trained_params"] == 2 * 3 * 9 + 3 * 2 + 16 * 2 + 2 * 3
    plain = TinyDenoiser()
    plain.load_state_dict(merged_state_dict(tuned.module))  # the LoRA folded in, under the plain names
    x = torch.randn(2, 3, 8, 8)
    cond = encode_ids(text, prompts.input_ids[:2])
    with torch.no_grad():
        torch.testing.assert_close(plain(x, torch.tensor([1, 2]), cond),
                                   tuned.module(sample=x, timestep=torch.tensor([1, 2]), encoder_hidden_states=cond))
    assert brightness(text, plain, prompts, spec) > brightness(text, denoiser, prompts, spec) + 0.01


def test_reward_finetune_refuses_branches_on_the_encoder_and_a_missing_text_encoder():
    graph, prompts, spec, denoiser = setup()
    rewards = WeightedRewards({"bright": (Brightness(1.0), 1.0)})
    with pytest.raises(RecipeError, match="target='denoiser'"):
        RewardFinetune(rewards, spec, (3, 8, 8), branches=("lora",))
    with pytest.raises(RecipeError, match="target must be"):
        RewardFinetune(rewards, spec, (3, 8, 8), target="vae")
    example = {"sample": torch.randn(2, 3, 8, 8), "timestep": torch.tensor([500, 900]),
               "encoder_hidden_states": torch.randn(2, LENGTH, WIDTH)}
    tune = RewardFinetune(rewards, spec, (3, 8, 8), RewardConfig(steps=1, batch=2), target="denoiser")
    with pytest.raises(PassError, match="text_encoder"):
        Pipeline([tune]).run(fxpress.capture(denoiser, (), example), PassContext(components={"prompts": prompts}))
