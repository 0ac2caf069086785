"""Replication: results compared by value, and a run in which a student's results pass every
screen but are wrong (sign flipped) ends with that student quarantined and the model exactly
where `train-local` puts it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO, ClassLogins
from ganns_async.cluster_state import read_snapshot
from ganns_async.db import Database
from ganns_async.replication import EXACT_TOLERANCE, LOCAL_TOLERANCE, SpotCheck, compare
from ganns_async.training import UnitResult
from test_end_to_end import _fetch, _spawn, _stop
from test_equivalence import SEED, STEPS, UNIT, _max_diff, _train_local


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


def test_a_student_whose_results_disagree_is_quarantined_and_never_counts(
        class_logins: ClassLogins, synth_zip: Path, tmp_path: Path) -> None:
    local = _train_local(synth_zip, tmp_path)
    data = ["--data", str(synth_zip)]
    workers = [subprocess.Popen([sys.executable, str(REPO / "tests" / "hostile_worker.py"), "negate",
                                 class_logins.mallory, str(synth_zip), "mallory"],
                                stdout=open(tmp_path / "mallory.log", "wb"), stderr=subprocess.STDOUT, cwd=REPO)]  # noqa: SIM115
    workers += [_spawn("worker", "--db", url, *data, "--name", who, "--threads", "1", log=tmp_path / f"{who}.log")
                for who, url in (("alice", class_logins.alice), ("bob", class_logins.bob))]
    out = tmp_path / "out"
    try:
        coord = _spawn("coordinator", "--db", class_logins.instructor, *data, "--no-tui", "--max-staleness", "0",
                       "--grad-dtype", "fp32", "--seed", str(SEED), "--unit-size", str(UNIT), "--units-per-step", "2",
                       "--max-steps", str(STEPS), "--checkpoint-every", str(STEPS), "--out", str(out),
                       "--local-steps", "1", "--spot-check", "1", log=tmp_path / "coord.log")
        assert coord.wait(400) == 0, (tmp_path / "coord.log").read_text()[-3000:]
    finally:
        for p in workers:
            _stop(p)
    ckpt = torch.load(out / "checkpoint_latest.pth", map_location="cpu")
    distributed = {**{f"G.{k}": v for k, v in ckpt["generator_raw_state_dict"].items()},
                   **{f"D.{k}": v for k, v in ckpt["discriminator_state_dict"].items()},
                   **{f"EMA.{k}": v for k, v in ckpt["generator_state_dict"].items()}}
    assert _max_diff(distributed, local) <= 1e-5, (tmp_path / "coord.log").read_text()[-3000:]
    mallory = class_logins.names[3]
    rows = asyncio.run(_fetch(class_logins.admin, "SELECT login, quarantined_at IS NOT NULL AS q, units_done "
                                                  "FROM workers ORDER BY id"))
    assert {r["login"]: r["q"] for r in rows} == {mallory: True, class_logins.names[1]: False,
                                                  class_logins.names[2]: False}, rows
    events = [r["message"] for r in asyncio.run(_fetch(class_logins.admin,
                                                       "SELECT message FROM events WHERE kind = 'quarantine'"))]
    # One event per result of hers that two others outvoted (two units may be in dispute at once).
    assert events and all("mallory" in e and "disagreed" in e for e in events), events

    async def dashboard_states() -> dict[str, str]:
        db = await Database.open(class_logins.viewer, max_size=1)  # the dashboards' own login
        try:
            snap = await read_snapshot(db, title="watch")
            return {w.name: w.state for w in snap.workers}
        finally:
            await db.close()

    states = asyncio.run(dashboard_states())
    assert [s for name, s in states.items() if name.startswith(mallory)] == ["quarantined"], states
