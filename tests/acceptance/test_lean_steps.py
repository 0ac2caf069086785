"""Lean steps and a bounded database, through the real CLI and a real PostgreSQL.

* Adam state is saved every ``--state-every`` steps only; a coordinator killed between
  saves resumes from the last one, replays the steps since, and still ends exactly where
  ``train-local`` ends, with every image counted once.
* Over a long run the database stays the same size (the coordinator vacuums the blob
  tables after each prune), and a worker holds two connections, both named.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import asyncpg
import pytest
import torch

from ganns_async.local import LocalOptions, train_local
from ganns_async.training import TrainConfig
from helpers import WIDTH, _fetch, _spawn, _stop

MB = 1024 * 1024


async def _wait_for_step(url: str, target: int, timeout: float = 240) -> int:
    """Block until the run has published version >= target (woken by ganns_weights)."""
    conn = await asyncpg.connect(url)
    moved = asyncio.Event()
    await conn.add_listener("ganns_weights", lambda *_: moved.set())
    try:
        async with asyncio.timeout(timeout):
            while True:
                moved.clear()
                step = await conn.fetchval("SELECT max(step) FROM runs") or 0
                if step >= target:
                    return int(step)
                await moved.wait()
    finally:
        await conn.close()


def _weights(ckpt: dict) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    return {**{f"G.{k}": v for k, v in ckpt["generator_raw_state_dict"].items()},
            **{f"D.{k}": v for k, v in ckpt["discriminator_state_dict"].items()},
            **{f"EMA.{k}": v for k, v in ckpt["generator_state_dict"].items()}}


@pytest.mark.parametrize("local_steps", [1, 2], ids=["exact", "local"])
@pytest.mark.slow(10)
def test_resume_between_state_saves_replays_to_the_exact_result(migrated_url: str, synth_zip: Path,
                                                                tmp_path: Path, local_steps: int) -> None:
    """Exact mode (fp32, Adam) and local mode (bf16 weights out and changes back, FedAvg:
    --resume must restore the fp32 master weights saved with the state, not the bf16
    broadcast) both replay to train-local's result."""
    # The narrow DCGAN (helpers.WIDTH) steps fast, so the window the kill must land in is
    # five steps wide (7 to 11).
    seed, unit, steps, every = 5, 8, 13, 6
    wire = "fp32" if local_steps == 1 else "bf16"
    common = ["--db", migrated_url, "--data", str(synth_zip)]
    run_args = ["--max-steps", str(steps), "--out", str(tmp_path / "out"), "--eval-every", "0",
                "--checkpoint-every", "100"]
    worker = _spawn("worker", *common, "--name", "steady", "--threads", "1", log=tmp_path / "w.log")
    try:
        coord = _spawn("coordinator", *common, *run_args, "--seed", str(seed), "--unit-size", str(unit),
                       "--units-per-step", "2", "--max-staleness", "0", "--grad-dtype", wire,
                       "--local-steps", str(local_steps), "--feature-maps", str(WIDTH),
                       "--state-every", str(every), log=tmp_path / "coord1.log")
        asyncio.run(_wait_for_step(migrated_url, 1))
        # Two more students online than units to share (2 units a step, staleness 0).
        asyncio.run(_fetch(migrated_url, "INSERT INTO workers (name, hostname, device, run_id) "
                                         "SELECT n, 'lab', 'cpu', (SELECT max(id) FROM runs) "
                                         "FROM unnest(ARRAY['idle-1', 'idle-2']) AS n RETURNING id"))
        killed_at = asyncio.run(_wait_for_step(migrated_url, every + 1))
        coord.send_signal(signal.SIGKILL)  # no chance to save state on the way out
        coord.wait(10)
        assert every < killed_at < 2 * every, "the kill must land between two state saves"
        resumed = _spawn("coordinator", *common, *run_args, "--resume", log=tmp_path / "coord2.log")
        assert resumed.wait(300) == 0, (tmp_path / "coord2.log").read_text()
    finally:
        _stop(worker)
    log = (tmp_path / "coord2.log").read_text()
    assert f"resumed at step {every}, the last saved state; replaying" in log, log
    per_step = 2 * unit * local_steps
    run = asyncio.run(_fetch(migrated_url, "SELECT step, status, images_seen FROM runs"))
    assert [tuple(r) for r in run] == [(steps, "done", steps * per_step)]  # each image counted once
    idle = asyncio.run(_fetch(migrated_url, "SELECT message FROM events WHERE kind = 'idle'"))
    assert len(idle) >= 1 and idle[0]["message"].startswith("1 of 3 workers idle"), idle
    assert "--units-per-step" in idle[0]["message"]
    metrics = asyncio.run(_fetch(migrated_url, "SELECT step, images FROM metrics ORDER BY step"))
    assert [tuple(r) for r in metrics] == [(s, per_step) for s in range(1, steps + 1)]

    distributed = torch.load(tmp_path / "out" / "checkpoint_latest.pth", map_location="cpu")
    if local_steps == 1:  # Adam's step count survived the replay
        assert float(next(iter(distributed["optimizer_g_state_dict"]["state"].values()))["step"]) == steps
    threads = torch.get_num_threads()
    try:
        cfg = TrainConfig(seed=seed, unit_size=unit, units_per_step=2, max_staleness=0, grad_dtype=wire,
                          local_steps=local_steps, feature_maps=WIDTH)
        local = train_local(LocalOptions(data=str(synth_zip), max_steps=steps, out=tmp_path / "local",
                                         config=cfg, checkpoint_every=steps, threads=1))
    finally:
        torch.set_num_threads(threads)
    ref = _weights(torch.load(tmp_path / "local" / "checkpoint_latest.pth", map_location="cpu"))
    got = _weights(distributed)
    assert got.keys() == ref.keys()
    worst = max(float((got[k].double() - ref[k].double()).abs().max()) for k in ref)
    assert worst <= 1e-5, f"replayed run differs from train-local by {worst}"
    assert local.images == steps * per_step


async def _sizes_and_connections(url: str, marks: list[int]) -> tuple[dict[int, int], list[tuple[str, int]]]:
    """Database size as each step in ``marks`` is published; connections seen at the first."""
    sizes: dict[int, int] = {}
    conns: list[tuple[str, int]] = []
    for mark in marks:
        await _wait_for_step(url, mark)
        c = await asyncpg.connect(url)
        try:
            sizes[mark] = int(await c.fetchval("SELECT pg_database_size(current_database())"))
            if not conns:
                rows = await c.fetch(
                    "SELECT application_name, count(*) AS n FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "GROUP BY 1 ORDER BY 1")
                conns = [(r["application_name"], int(r["n"])) for r in rows]
        finally:
            await c.close()
    return sizes, conns


@pytest.mark.slow(30)
def test_database_stays_flat_over_60_steps_and_a_worker_holds_two_connections(
        migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    """The default configuration (local steps, bf16 weights and changes, one unit per
    online worker) at --feature-maps 32 (a quarter of the compute and of the bytes): about
    6 MB of blobs are written and deleted every step, 360 MB over the run, which the file
    would mostly keep without the vacuum."""
    steps = 60
    common = ["--db", migrated_url, "--data", str(synth_zip)]
    coord = _spawn("coordinator", "--local-steps", "2", *common, "--max-steps", str(steps), "--unit-size", "2", "--eval-every", "0",
                   "--feature-maps", "32",
                   "--checkpoint-every", "1000", "--out", str(tmp_path / "out"), log=tmp_path / "coord.log")
    worker = _spawn("worker", *common, "--name", "long\x1b]0;haul", "--threads", "1", log=tmp_path / "w.log")
    try:
        sizes, conns = asyncio.run(_sizes_and_connections(migrated_url, [20, 30, steps]))
        assert coord.wait(120) == 0, (tmp_path / "coord.log").read_text()[-3000:]
    finally:
        _stop(worker)
        _stop(coord)
    print("database size by step (MB):", {k: round(v / MB) for k, v in sizes.items()}, "connections:", conns)
    assert sizes[steps] <= 300 * MB
    # Flat after warm-up: from step 30 to 60 it may wobble, not climb (about 180 MB of blobs
    # pass through those 30 steps; without the vacuum the file would grow by most of it).
    assert sizes[steps] - sizes[30] <= 40 * MB, sizes
    named = dict(conns)
    # The worker's name is sanitized into application_name (escape bytes become '?').
    assert named.get("ganns-async worker long?]0;haul") == 2, conns
    assert named.get("ganns-async coordinator", 0) >= 2, conns  # pool + listener + run lock
    assert all(name.startswith("ganns-async ") for name, _ in conns), conns
