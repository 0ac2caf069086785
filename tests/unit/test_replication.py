"""Replication: results are compared by value, and spot checks choose what to replicate.
(A run in which a student's results pass every screen but are wrong, sign flipped:
tests/acceptance/test_replication_run.py.)"""

from __future__ import annotations

import torch

from ganns_async.replication import EXACT_TOLERANCE, LOCAL_TOLERANCE, SpotCheck, compare
from ganns_async.training import UnitResult


def _result(seed: int = 0, scale: float = 1.0) -> UnitResult:
    gen = torch.Generator().manual_seed(seed)
    grads = {"G.w": torch.randn(64, 32, generator=gen) * scale, "D.w": torch.randn(128, generator=gen) * scale}
    buffers = {"D.bn.running_var": torch.rand(16, generator=gen) + 0.5}
    return UnitResult(grads, buffers, 32, {})


def test_compare_tells_honest_noise_from_tampering() -> None:
    a = _result()
    assert compare(a, _result()).bitwise
    noisy = UnitResult({k: v * (1 + 1e-3 * torch.randn_like(v)) for k, v in a.grads.items()}, a.buffers, 32, {})
    assert not compare(a, noisy).bitwise and compare(a, noisy).within(EXACT_TOLERANCE)
    negated = UnitResult({k: -v for k, v in a.grads.items()}, a.buffers, 32, {})
    assert not compare(a, negated).within(LOCAL_TOLERANCE)
    doubled = UnitResult({k: 2 * v for k, v in a.grads.items()}, a.buffers, 32, {})
    assert compare(a, doubled).cosine > 0.999 and not compare(a, doubled).within(LOCAL_TOLERANCE)
    other = _result(seed=1)
    assert not compare(a, other).within(LOCAL_TOLERANCE)
    fewer = UnitResult(a.grads, a.buffers, 31, {})
    assert not compare(a, fewer).within(LOCAL_TOLERANCE)


def test_spot_check_checks_new_workers_then_a_share() -> None:
    spot = SpotCheck(rate=0.25, new_worker_checks=2, seed=3)
    assert spot.wanted(7) and spot.wanted(7)  # new: always
    spot.confirmed(7)
    spot.confirmed(7)
    share = sum(spot.wanted(7) for _ in range(4000)) / 4000
    assert 0.2 < share < 0.3
    assert not any(SpotCheck(rate=0.0).wanted(1) for _ in range(100))
