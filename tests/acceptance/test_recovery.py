"""Bad input and crashes lose no data: hostile gradients, a coordinator killed mid-run."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import asyncpg
import pytest
import torch

from helpers import WIDTH, _fetch, _spawn, _stop


async def _plant_hostile_gradient(url: str, payload: bytes) -> int:
    """Act like a malicious client with plain SQL: claim a unit and store garbage for it."""
    conn = await asyncpg.connect(url)
    try:
        ready = asyncio.Event()
        await conn.add_listener("ganns_units", lambda *_: ready.set())
        while True:
            ready.clear()
            run_id = await conn.fetchval("SELECT id FROM runs WHERE status = 'running'")
            unit = None
            if run_id is not None:
                unit = await conn.fetchrow(
                    "SELECT id, version FROM work_units WHERE run_id = $1 AND state = 'pending' ORDER BY id LIMIT 1",
                    run_id)
            if unit is not None:
                break
            await asyncio.wait_for(ready.wait(), 120)
        worker = await conn.fetchval(
            "INSERT INTO workers (name, hostname, device) VALUES ('mallory', 'evil', 'cpu') RETURNING id")
        async with conn.transaction():
            # Claimed, then done: the path the guard trigger (sql/004_states.sql) allows.
            await conn.execute(
                "UPDATE work_units SET state = 'claimed', worker_id = $2 WHERE id = $1", unit["id"], worker)
            await conn.execute("UPDATE work_units SET state = 'done' WHERE id = $1", unit["id"])
            await conn.execute(
                "INSERT INTO gradients (unit_id, run_id, worker_id, version, n_samples, payload) "
                "VALUES ($1, $2, $3, $4, 16, $5)", unit["id"], run_id, worker, unit["version"], payload)
        return unit["id"]
    finally:
        await conn.close()


def _run_with_planted_result(url: str, data: Path, tmp_path: Path, payload: bytes, *coord_args: str) -> int:
    """A coordinator run in which mallory stores ``payload`` for the first unit and one
    honest worker does the rest; returns mallory's unit."""
    common = ["--db", url, "--data", str(data)]
    coord = _spawn("coordinator", *common, *coord_args, "--eval-every", "0", "--out", str(tmp_path / "out"),
                   log=tmp_path / "coord.log")
    worker = None
    try:
        unit_id = asyncio.run(_plant_hostile_gradient(url, payload))
        worker = _spawn("worker", *common, "--name", "honest", "--threads", "1", log=tmp_path / "w.log")
        assert coord.wait(240) == 0, (tmp_path / "coord.log").read_text()
    finally:
        if worker is not None:
            _stop(worker)
        _stop(coord)
    return unit_id


def test_hostile_gradient_is_rejected_and_its_unit_recomputed(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    unit_id = _run_with_planted_result(migrated_url, synth_zip, tmp_path, b"\x28\xb5\x2f\xfd" + b"not really zstd" * 10,
                                       "--local-steps", "2", "--max-steps", "2", "--unit-size", "16",
                                       "--units-per-step", "2", "--feature-maps", "16")
    rejections = asyncio.run(_fetch(migrated_url, "SELECT unit_id, reason, w.name FROM rejections r "
                                                  "JOIN workers w ON w.id = r.worker_id"))
    assert len(rejections) == 1 and rejections[0]["unit_id"] == unit_id and rejections[0]["name"] == "mallory"
    assert "corrupt" in rejections[0]["reason"] or "zstd" in rejections[0]["reason"]
    events = asyncio.run(_fetch(migrated_url, "SELECT message FROM events WHERE kind = 'rejected'"))
    assert len(events) == 1 and "mallory" in events[0]["message"]
    # The rejected unit was recomputed by the honest worker and the run finished.
    assert [tuple(r) for r in asyncio.run(_fetch(migrated_url, "SELECT status, step FROM runs"))] == [("done", 2)]


@pytest.mark.slow(22)
def test_coordinator_killed_mid_run_resumes_from_the_database(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    common = ["--db", migrated_url, "--data", str(synth_zip)]
    out = tmp_path / "out"
    worker = _spawn("worker", *common, "--name", "steady", "--threads", "1", log=tmp_path / "w.log")
    try:
        coord = _spawn("coordinator", *common, "--max-steps", "4", "--unit-size", "16", "--units-per-step", "2",
                       "--local-steps", "1", "--feature-maps", str(WIDTH), "--eval-every", "0", "--out", str(out),
                       log=tmp_path / "coord1.log")

        async def wait_for_step(target: int) -> None:
            conn = await asyncpg.connect(migrated_url)
            moved = asyncio.Event()
            await conn.add_listener("ganns_weights", lambda *_: moved.set())
            try:
                while (await conn.fetchval("SELECT max(step) FROM runs") or 0) < target:
                    moved.clear()
                    if (await conn.fetchval("SELECT max(step) FROM runs") or 0) >= target:
                        break
                    await asyncio.wait_for(moved.wait(), 120)
            finally:
                await conn.close()

        asyncio.run(wait_for_step(2))
        coord.send_signal(signal.SIGKILL)
        coord.wait(10)
        before = asyncio.run(_fetch(migrated_url, "SELECT id, step, status FROM runs"))
        assert before[0]["status"] == "running" and before[0]["step"] >= 2
        resumed = _spawn("coordinator", *common, "--resume", "--max-steps", "4", "--eval-every", "0", "--out", str(out),
                         log=tmp_path / "coord2.log")
        assert resumed.wait(240) == 0, (tmp_path / "coord2.log").read_text()
    finally:
        _stop(worker)
    after = asyncio.run(_fetch(migrated_url, "SELECT id, step, status, images_seen FROM runs"))
    assert [(r["id"], r["step"], r["status"]) for r in after] == [(before[0]["id"], 4, "done")]
    assert after[0]["images_seen"] == 4 * 32
    assert "resumed at step" in (tmp_path / "coord2.log").read_text()
    ckpt = torch.load(out / "checkpoint_latest.pth", map_location="cpu")
    assert ckpt["step"] == 4
    # Adam's step counter survived the crash: 4 optimizer steps in all.
    state = ckpt["optimizer_g_state_dict"]["state"]
    assert float(next(iter(state.values()))["step"]) == 4.0


def test_step_closes_on_its_deadline_with_min_units(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    """A unit held by a silent worker does not block the class: the step closes without it."""
    common = ["--db", migrated_url, "--data", str(synth_zip)]
    coord = _spawn("coordinator", *common, "--max-steps", "2", "--unit-size", "8", "--units-per-step", "3",
                   "--local-steps", "1", "--feature-maps", str(WIDTH), "--step-timeout", "6", "--min-units", "2", "--max-staleness", "0", "--eval-every", "0",
                   "--out", str(tmp_path / "out"), log=tmp_path / "coord.log")

    async def hog() -> int:
        """Claim the first unit with a long lease and never finish it."""
        conn = await asyncpg.connect(migrated_url)
        try:
            ready = asyncio.Event()
            await conn.add_listener("ganns_units", lambda *_: ready.set())
            while True:
                ready.clear()
                unit = await conn.fetchval(
                    "UPDATE work_units SET state = 'claimed', lease_until = now() + interval '1 hour' "
                    "WHERE id = (SELECT min(id) FROM work_units WHERE state = 'pending') RETURNING id")
                if unit is not None:
                    return unit
                await asyncio.wait_for(ready.wait(), 120)
        finally:
            await conn.close()

    worker = None
    try:
        held = asyncio.run(hog())
        worker = _spawn("worker", *common, "--name", "busy", "--threads", "1", log=tmp_path / "w.log")
        assert coord.wait(240) == 0, (tmp_path / "coord.log").read_text()
    finally:
        if worker is not None:
            _stop(worker)
        _stop(coord)
    metrics = asyncio.run(_fetch(migrated_url, "SELECT step, units, images FROM metrics ORDER BY step"))
    assert [tuple(r) for r in metrics] == [(1, 2, 16), (2, 3, 24)]
    unit = asyncio.run(_fetch(migrated_url, "SELECT state FROM work_units WHERE id = $1", held))
    assert unit[0]["state"] == "cancelled"
    assert "closed on its deadline with 2 unit(s)" in (tmp_path / "coord.log").read_text()


def test_a_second_coordinator_cannot_take_over_a_live_run(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    from helpers import cli

    common = ["--db", migrated_url, "--data", str(synth_zip)]
    first = _spawn("coordinator", "--local-steps", "2", *common, "--max-steps", "5", "--feature-maps", str(WIDTH),
                   "--eval-every", "0", "--out", str(tmp_path / "a"),
                   log=tmp_path / "first.log")
    try:
        async def wait_for_run() -> None:
            conn = await asyncpg.connect(migrated_url)
            changed = asyncio.Event()
            await conn.add_listener("ganns_units", lambda *_: changed.set())
            try:
                while not await conn.fetchval("SELECT count(*) FROM work_units"):
                    changed.clear()
                    if await conn.fetchval("SELECT count(*) FROM work_units"):
                        break
                    await asyncio.wait_for(changed.wait(), 120)
            finally:
                await conn.close()

        asyncio.run(wait_for_run())
        second = cli("coordinator", *common, "--resume", "--max-steps", "5", "--out", str(tmp_path / "b"))
        assert second.returncode != 0
        assert "being coordinated by another process" in second.stderr and "Traceback" not in second.stderr
    finally:
        _stop(first)
    # Interrupted, the first one paused its run: a later --resume may take it.
    status = asyncio.run(_fetch(migrated_url, "SELECT status FROM runs"))
    assert status[0]["status"] == "paused"


def test_operator_pauses_resumes_and_stops_the_run(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    from helpers import cli

    common = ["--db", migrated_url, "--data", str(synth_zip)]
    coord = _spawn("coordinator", "--local-steps", "2", *common, "--max-steps", "1000", "--unit-size", "8",
                   "--feature-maps", str(WIDTH), "--eval-every", "0",
                   "--out", str(tmp_path / "out"), log=tmp_path / "coord.log")
    worker = _spawn("worker", *common, "--name", "obedient", "--threads", "1", log=tmp_path / "w.log")
    try:
        from helpers import _wait_for_worker_state

        asyncio.run(_wait_for_worker_state(migrated_url, "obedient", "computing"))
        paused = cli("control", "pause", "--db", migrated_url)
        assert paused.returncode == 0 and "running -> paused" in paused.stdout, paused.stderr
        assert cli("control", "pause", "--db", migrated_url).returncode != 0  # already paused
        resumed = cli("control", "resume", "--db", migrated_url)
        assert resumed.returncode == 0 and "paused -> running" in resumed.stdout
        stopped = cli("control", "stop", "--db", migrated_url)
        assert stopped.returncode == 0, stopped.stderr
        assert coord.wait(120) == 0, (tmp_path / "coord.log").read_text()
    finally:
        _stop(worker)
        _stop(coord)
    runs = asyncio.run(_fetch(migrated_url, "SELECT status FROM runs"))
    assert runs[0]["status"] == "stopped"
    assert (tmp_path / "out" / "checkpoint_latest.pth").exists()
    events = asyncio.run(_fetch(migrated_url, "SELECT message FROM events WHERE kind IN ('control', 'run')"))
    assert any("stopped by the operator" in e["message"] for e in events)


def test_a_change_no_honest_unit_could_make_is_refused(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    """Local mode: a well-formed payload whose weights moved further than the unit's Adam
    steps can move them (here: every weight by 1.0) is refused, and an honest worker
    recomputes the unit."""
    from ganns_async import codec
    from ganns_async.model import build_models
    from ganns_async.training import state_tensors

    g, d = build_models(0, WIDTH)
    params = {f"G.{k}" for k, _ in g.named_parameters()} | {f"D.{k}" for k, _ in d.named_parameters()}
    forged = {k: (torch.ones_like(v) if k in params else v) for k, v in state_tensors(g, d).items()}
    payload = codec.encode_tensors(forged, meta={"n_samples": 16, "metrics": {}, "skipped": 0},
                                 float_dtype="bf16")
    unit_id = _run_with_planted_result(migrated_url, synth_zip, tmp_path, payload, "--local-steps", "2",
                                       "--max-steps", "1", "--unit-size", "8", "--units-per-step", "2",
                                       "--feature-maps", str(WIDTH))
    rejections = asyncio.run(_fetch(migrated_url, "SELECT unit_id, reason FROM rejections"))
    assert len(rejections) == 1 and rejections[0]["unit_id"] == unit_id
    assert "changed by 1" in rejections[0]["reason"] and "Adam steps" in rejections[0]["reason"]
    run = asyncio.run(_fetch(migrated_url, "SELECT status, step, images_seen FROM runs"))
    assert [tuple(r) for r in run] == [("done", 1, 32)]  # both units honest in the end: 2 x 2 steps x 8
    ckpt = torch.load(tmp_path / "out" / "checkpoint_latest.pth", map_location="cpu", weights_only=True)
    assert float(ckpt["generator_raw_state_dict"]["main.0.weight"].abs().max()) < 1.0


def test_a_unit_with_bad_indices_is_reported_and_the_worker_goes_on(migrated_url: str, synth_zip: Path,
                                                                     tmp_path: Path) -> None:
    """Units come from the database: one with an index outside the dataset must not crash the
    worker. It reports the unit unusable (cancelled at once for the instructor's machines)
    and computes the next one."""
    from ganns_async import codec
    from ganns_async.data import ImageDataset
    from ganns_async.model import build_models
    from ganns_async.training import TrainConfig, state_tensors

    cfg = TrainConfig(seed=1, unit_size=4, units_per_step=2, local_steps=1, grad_dtype="fp32", feature_maps=WIDTH)
    with ImageDataset.open(synth_zip) as ds:
        fingerprint, size = ds.fingerprint, len(ds)
    g, d = build_models(cfg.seed, cfg.feature_maps)
    weights = codec.encode_tensors(state_tensors(g, d), float_dtype="fp32")

    async def setup() -> tuple[int, int, int]:
        conn = await asyncpg.connect(migrated_url)
        try:
            run_id = await conn.fetchval("INSERT INTO runs (config, dataset_fingerprint, dataset_size) "
                                         "VALUES ($1, $2, $3) RETURNING id", cfg.to_json(), fingerprint, size)
            await conn.execute("INSERT INTO weights (run_id, version, payload) VALUES ($1, 0, $2)", run_id, weights)
            bad = await conn.fetchval("INSERT INTO work_units (run_id, seq, step, version, epoch, indices, noise_seed) "
                                      "VALUES ($1, 0, 0, 0, 0, $2, 5) RETURNING id", run_id, [0, size + 1000, -1])
            good = await conn.fetchval("INSERT INTO work_units (run_id, seq, step, version, epoch, indices, noise_seed) "
                                       "VALUES ($1, 1, 0, 0, 0, '{1,2}', 6) RETURNING id", run_id)
            return run_id, bad, good
        finally:
            await conn.close()

    async def wait_until_done(good: int) -> None:
        conn = await asyncpg.connect(migrated_url)
        try:
            arrived = asyncio.Event()
            await conn.add_listener("ganns_gradients", lambda *_: arrived.set())
            while await conn.fetchval("SELECT state FROM work_units WHERE id = $1", good) != "done":
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 120)
        finally:
            await conn.close()

    run_id, bad, good = asyncio.run(setup())
    worker = _spawn("worker", "--db", migrated_url, "--data", str(synth_zip), "--name", "steady", "--threads", "1",
                    log=tmp_path / "w.log")
    try:
        asyncio.run(wait_until_done(good))
        assert worker.poll() is None, (tmp_path / "w.log").read_text()
    finally:
        _stop(worker)
    states = dict(asyncio.run(_fetch(migrated_url, "SELECT id, state FROM work_units")))
    assert states == {bad: "cancelled", good: "done"}
    reasons = [r["reason"] for r in asyncio.run(_fetch(migrated_url, "SELECT reason FROM rejections"))]
    assert len(reasons) == 1 and reasons[0].startswith("unusable: image index -1 outside")
    log = (tmp_path / "w.log").read_text()
    assert "cannot be computed here" in log and "Traceback" not in log
