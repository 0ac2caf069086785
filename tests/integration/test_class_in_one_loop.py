"""A class in one event loop: the coordinator and two workers run as asyncio tasks of one
process against a real PostgreSQL, the protocol and the arithmetic without the CLI around
them. A synchronous fp32 run must end where ``train-local`` ends, bit for bit, with every
image counted once, and a worker cancelled mid-run (a student closing the laptop lid)
must give its unit back at once for the other to compute.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from ganns_async.coordinator import Coordinator, CoordinatorOptions
from ganns_async.training import TrainConfig
from ganns_async.worker import Worker, WorkerOptions
from helpers import SEED, STEPS, UNIT, UNITS_PER_STEP, WIDTH, _fetch, _max_diff, _train_local

IMAGES = STEPS * UNITS_PER_STEP * UNIT


def _checkpoint_state(out: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(out / "checkpoint_latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["step"] == STEPS and ckpt["images_seen"] == IMAGES
    return {**{f"G.{k}": v for k, v in ckpt["generator_raw_state_dict"].items()},
            **{f"D.{k}": v for k, v in ckpt["discriminator_state_dict"].items()},
            **{f"EMA.{k}": v for k, v in ckpt["generator_state_dict"].items()}}


def _coordinator(url: str, data: Path, out: Path, feature_maps: int = WIDTH) -> Coordinator:
    cfg = TrainConfig(seed=SEED, unit_size=UNIT, units_per_step=UNITS_PER_STEP, max_staleness=0,
                      grad_dtype="fp32", local_steps=1, feature_maps=feature_maps)
    return Coordinator(CoordinatorOptions(
        db_url=url, data=str(data), out=out, max_steps=STEPS, config=cfg, checkpoint_every=STEPS,
        eval_every=0, spot_check=0.0, sweep_s=5, step_timeout=600))


def _worker(url: str, data: Path, name: str) -> Worker:
    return Worker(WorkerOptions(db_url=url, data=str(data), name=name, device="cpu", threads=1,
                                lease_s=30, heartbeat_s=2, sweep_s=5))


async def _class_run(url: str, data: Path, out: Path, *, names: tuple[str, ...] = ("goer", "stayer"),
                     leaver: bool = False) -> None:
    """Workers and a coordinator as tasks; with ``leaver``, worker "goer" is cancelled as soon
    as it holds a unit of step 1, and the run must still finish."""
    workers = {name: _worker(url, data, name) for name in names}
    tasks = {name: asyncio.create_task(w.run(), name=name) for name, w in workers.items()}
    coordinating = asyncio.create_task(_coordinator(url, data, out).run(), name="coordinator")
    try:
        if leaver:
            # Woken by the worker's own status callback, not by polling.
            holding = asyncio.Event()
            workers["goer"].on_status = lambda s: holding.set() if s.unit_id is not None and s.unit_step == 1 else None
            await asyncio.wait_for(holding.wait(), 120)
            tasks["goer"].cancel()
            await asyncio.gather(tasks["goer"], return_exceptions=True)
        assert await asyncio.wait_for(coordinating, 300) == 0
    finally:
        coordinating.cancel()
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(coordinating, *tasks.values(), return_exceptions=True)


def _rows(url: str, sql: str) -> list[tuple[object, ...]]:
    return [tuple(r) for r in asyncio.run(_fetch(url, sql))]


@pytest.mark.parametrize("names", [("goer", "stayer"), ("stayer",)], ids=["two workers", "one worker"])
def test_a_class_in_one_loop_ends_where_train_local_ends(migrated_url: str, synth_zip: Path, tmp_path: Path,
                                                        names: tuple[str, ...]) -> None:
    asyncio.run(_class_run(migrated_url, synth_zip, tmp_path / "out", names=names))
    got = _checkpoint_state(tmp_path / "out")
    assert _max_diff(got, _train_local(synth_zip, tmp_path, feature_maps=WIDTH)) == 0.0
    assert _rows(migrated_url, "SELECT step, status, images_seen FROM runs") == [(STEPS, "done", IMAGES)]
    assert _rows(migrated_url, "SELECT step, images, units FROM metrics WHERE step >= 1 ORDER BY step") == [
        (s, UNITS_PER_STEP * UNIT, UNITS_PER_STEP) for s in range(1, STEPS + 1)]
    workers = _rows(migrated_url, "SELECT name, state, units_done FROM workers ORDER BY name")
    assert [(name, state) for name, state, _ in workers] == [(name, "offline") for name in names]
    assert sum(done for *_, done in workers) == STEPS * UNITS_PER_STEP  # no copies: spot checks off
    assert _rows(migrated_url, "SELECT id FROM gradients") == []


def test_a_worker_cancelled_mid_unit_gives_it_back_and_the_run_is_still_exact(
        migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    asyncio.run(_class_run(migrated_url, synth_zip, tmp_path / "out", leaver=True))
    got = _checkpoint_state(tmp_path / "out")
    assert _max_diff(got, _train_local(synth_zip, tmp_path, feature_maps=WIDTH)) == 0.0
    assert _rows(migrated_url, "SELECT step, status, images_seen FROM runs") == [(STEPS, "done", IMAGES)]
    # The unit it held went back at once (`leave` releases claims; no lease had to expire,
    # so the sweep requeued nothing) and was computed by the worker that stayed.
    events = _rows(migrated_url, "SELECT kind, message FROM events ORDER BY id")
    assert [m.split(" after ")[0] for k, m in events if k == "leave"] == ["goer left", "stayer left"], events
    assert [m for k, m in events if k == "requeue"] == [], events
    workers = dict(_rows(migrated_url, "SELECT name, units_done FROM workers"))
    assert workers["stayer"] > workers["goer"], workers


def test_workers_follow_each_run_to_its_width(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    """The same two workers (built at the default width, 64) stay online through a run at
    --feature-maps 8 and then one at 16: each time they build networks of the run's width,
    and the second run still ends where train-local at that width ends, bit for bit."""
    async def two_runs() -> None:
        tasks = [asyncio.create_task(_worker(migrated_url, synth_zip, name).run()) for name in ("ann", "ben")]
        try:
            for width in (8, 16):
                run = _coordinator(migrated_url, synth_zip, tmp_path / f"out{width}", feature_maps=width).run()
                assert await asyncio.wait_for(run, 300) == 0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(two_runs())
    got = _checkpoint_state(tmp_path / "out16")
    assert got["G.main.0.weight"].shape == (100, 16 * 8, 4, 4)
    assert _max_diff(got, _train_local(synth_zip, tmp_path, feature_maps=16)) == 0.0
    assert _rows(migrated_url, "SELECT step, status, images_seen FROM runs ORDER BY id") == [
        (STEPS, "done", IMAGES), (STEPS, "done", IMAGES)]
    units = dict(_rows(migrated_url, "SELECT name, units_done FROM workers"))
    assert sum(units.values()) == 2 * STEPS * UNITS_PER_STEP, units


@pytest.mark.parametrize("width", [100_000, "wide"])
def test_a_worker_refuses_a_run_whose_width_no_coordinator_makes(migrated_url: str, synth_zip: Path,
                                                                  width: object) -> None:
    """The width sizes what a worker allocates: a run whose configuration asks for networks
    no coordinator would make (written by hand into the database) is refused with one line,
    before any memory is spent on it."""
    import json

    from ganns_async.data import ImageDataset
    from ganns_async.errors import UserError

    with ImageDataset.open(str(synth_zip)) as ds:
        fingerprint, size = ds.fingerprint, len(ds)
    config = json.loads(TrainConfig(seed=SEED, unit_size=UNIT).to_json()) | {"feature_maps": width}
    asyncio.run(_fetch(migrated_url, "INSERT INTO runs (config, dataset_fingerprint, dataset_size, status) "
                                     "VALUES ($1::jsonb, $2, $3, 'running')", json.dumps(config), fingerprint, size))
    with pytest.raises(UserError, match="refusing to join run .*: its configuration is not one a coordinator makes"):
        asyncio.run(asyncio.wait_for(_worker(migrated_url, synth_zip, "careful").run(), 120))
