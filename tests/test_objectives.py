"""The shared training objectives: batch draw orders and the KD loss's normalisations."""

import pytest
import torch
from diffusers import DDPMScheduler

from fxpress.errors import TrainingError
from fxpress.training.diffusion_data import DiffusionData
from fxpress.training.objectives import kd_loss, noised_batch


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    return DiffusionData(torch.randn(6, 1, 4, 4, generator=gen), torch.randn(6, 2, 3, generator=gen),
                         torch.zeros(1, 2, 3), DDPMScheduler(num_train_timesteps=1000))


@pytest.mark.parametrize("timesteps_first", [False, True])
def test_noised_batch_draws_in_its_documented_order(data, timesteps_first):
    gen = torch.Generator().manual_seed(3)
    x0, cond = data.batch(gen, 5)
    if timesteps_first:  # KD recovery's order since its first release
        t = torch.randint(0, 1000, (5,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
    else:
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (5,), generator=gen)
    b = noised_batch(data, torch.Generator().manual_seed(3), 5, timesteps_first=timesteps_first)
    assert torch.equal(b.x0, x0) and torch.equal(b.cond, cond)
    assert torch.equal(b.t, t) and torch.equal(b.noise, noise)
    assert torch.equal(b.noisy, data.add_noise(x0, noise, t))


def test_the_two_orders_give_different_batches(data):
    a = noised_batch(data, torch.Generator().manual_seed(3), 5)
    b = noised_batch(data, torch.Generator().manual_seed(3), 5, timesteps_first=True)
    assert torch.equal(a.x0, b.x0) and not torch.equal(a.noise, b.noise)


def test_kd_loss_normalisations():
    gen = torch.Generator().manual_seed(0)
    teacher, student = 3 * torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    ft, fs = {"a": 5 * torch.randn(4, 2, generator=gen)}, {"a": torch.randn(4, 2, generator=gen)}
    out = torch.mean((student - teacher) ** 2)
    feat = torch.mean((fs["a"] - ft["a"]) ** 2)
    assert torch.allclose(kd_loss(student, teacher, fs, ft, feature_weight=0.5, normalize="none"), out + 0.5 * feat)
    assert torch.allclose(kd_loss(student, teacher, fs, ft, feature_weight=0.5),
                          out + 0.5 * feat / ft["a"].var())
    assert torch.allclose(kd_loss(student, teacher, fs, ft, feature_weight=0.5, normalize="all"),
                          out / teacher.var() + 0.5 * feat / ft["a"].var())
    with pytest.raises(TrainingError, match="differ in shape"):
        kd_loss(student, teacher[:, :4])
    with pytest.raises(TrainingError, match="normalize"):
        kd_loss(student, teacher, normalize="batch")
