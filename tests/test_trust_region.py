"""The trust region on a tuned encoder's conditioning: its distance, and a penalty that pulls only past the limit."""

from __future__ import annotations

import pytest
import torch

from fxpress.errors import FxpressError
from fxpress.training.trust_region import drift_penalty, relative_drift


def test_relative_drift_is_the_mean_squared_relative_distance_per_row():
    original = torch.randn(3, 4, 5)
    tuned = original.clone()
    tuned[0] *= 1.1  # 10% away: 0.01; the other rows unchanged
    tuned[1] = original[1] - 0.5 * original[1]  # 50% away: 0.25
    assert float(relative_drift(tuned, original)) == pytest.approx((0.01 + 0.25) / 3, rel=1e-5)
    assert float(relative_drift(original, original)) == 0.0
    with pytest.raises(FxpressError, match="differ in shape"):
        relative_drift(tuned[:2], original)


def test_drift_penalty_pulls_only_past_the_limit():
    original = torch.ones(2, 8)
    tuned = (1.2 * original).requires_grad_(True)  # 20% away on every row: drift 0.04
    drift = relative_drift(tuned, original)
    inside = drift_penalty(drift, 0.25, 100.0)
    inside.backward(retain_graph=True)
    assert float(inside) == 0.0 and torch.count_nonzero(tuned.grad) == 0
    tuned.grad = None
    outside = drift_penalty(drift, 0.1, 100.0)
    outside.backward()
    assert float(outside) == pytest.approx(100.0 * (0.04 - 0.01), rel=1e-5)
    # d/dx of 100 * mean_rows(sum (x - 1)^2 / 8): 100 * 2 * 0.2 / (2 * 8) per element, pulling back
    assert torch.allclose(tuned.grad, torch.full_like(tuned, 100.0 * 2 * 0.2 / 16))


def _drift_on_two_ranks(rank: int, store: str, results: str) -> None:
    """One of two gloo processes: rank 0's half of the batch is 10% away, rank 1's 30% (drifts 0.01, 0.09)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        original = torch.ones(2, 4)
        drift = relative_drift((1.1 if rank == 0 else 1.3) * original, original)
        out = {str(limit): float(drift_penalty(drift, limit, 10.0)) for limit in (0.2, 0.25)}  # 0.04 < 0.05 < 0.0625
        torch.save(out, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_under_torchrun_the_limit_compares_with_the_whole_batch(tmp_path):
    # rank 0 alone is inside both limits and rank 1 alone outside both: a local decision would differ by rank
    torch.multiprocessing.spawn(_drift_on_two_ranks, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    for rank, drift in ((0, 0.01), (1, 0.09)):
        out = torch.load(tmp_path / f"out.{rank}")
        assert out["0.25"] == 0.0  # the whole batch (0.05) is inside 0.25: no pull on either rank
        assert out["0.2"] == pytest.approx(10.0 * (drift - 0.04), abs=1e-6)  # outside 0.2: each rank's own term
