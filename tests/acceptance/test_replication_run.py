"""Replication in a run: a student whose results pass every screen but are wrong (sign
flipped) ends quarantined, and the model exactly where `train-local` puts it (the real CLI
and tests/acceptance/hostile_worker.py in subprocesses)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from ganns_async.cluster_state import read_snapshot
from ganns_async.db import Database
from helpers import (
    REPO, SEED, STEPS, UNIT, WIDTH, ClassLogins, _fetch, _max_diff, _spawn, _spawn_script, _stop, _train_local,
)

HOSTILE_WORKER = REPO / "tests" / "acceptance" / "hostile_worker.py"


@pytest.mark.slow(6)
def test_a_student_whose_results_disagree_is_quarantined_and_never_counts(
        class_logins: ClassLogins, synth_zip: Path, tmp_path: Path) -> None:
    local = _train_local(synth_zip, tmp_path, feature_maps=WIDTH)
    data = ["--data", str(synth_zip)]
    workers = [_spawn_script(HOSTILE_WORKER, "negate", class_logins.mallory, str(synth_zip), "mallory",
                            log=tmp_path / "mallory.log")]
    workers += [_spawn("worker", "--db", url, *data, "--name", who, "--threads", "1", log=tmp_path / f"{who}.log")
                for who, url in (("alice", class_logins.alice), ("bob", class_logins.bob))]
    out = tmp_path / "out"
    try:
        coord = _spawn("coordinator", "--db", class_logins.instructor, *data, "--no-tui", "--max-staleness", "0",
                   "--feature-maps", str(WIDTH),
                       "--grad-dtype", "fp32", "--seed", str(SEED), "--unit-size", str(UNIT), "--units-per-step", "2",
                       "--max-steps", str(STEPS), "--checkpoint-every", str(STEPS), "--eval-every", "0", "--out", str(out),
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
