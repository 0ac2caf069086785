"""Reads the cluster's state from PostgreSQL into a dashboard snapshot.

Used by the coordinator's dashboard and by ``ganns-async watch``. Queries run when a
notification says something changed (workers, weights, events, control), at most a few
times per second, plus a slow liveness refresh so "last seen" ages keep moving.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ganns_async import codec
from ganns_async.dashboard import ClassResources, ClusterSnapshot, EventLine, GpuModel, StepPoint, WorkerRow
from ganns_async.db import (
    CONNECTION_ERRORS,
    CONTROL_CHANNEL,
    EVENTS_CHANNEL,
    WEIGHTS_CHANNEL,
    WORKERS_CHANNEL,
    Database,
    Listener,
)
from ganns_async.model import Discriminator, Generator
from ganns_async.states import QUARANTINED, STALE, WorkerState
from ganns_async.terminal import printable
from ganns_async.training import (
    TrainConfig,
    generate,
    load_state_tensors,
    sample_noise,
    state_tensors,
)
from ganns_async.waiting import wait_event

STALE_AFTER_S = 30.0  # three missed heartbeats (also the window of ganns_view.class_resources)
HISTORY_STEPS = 60
EVENT_LINES = 30


def preview_image(g: Generator, seed: int, n: int = 16) -> np.ndarray:
    """A 4x4 grid of faces from the run's fixed sample noise, as an H x W x 3 uint8 array."""
    from torchvision.utils import make_grid

    images = generate(g, sample_noise(seed, n))
    grid = make_grid((images + 1) / 2, nrow=int(n**0.5), padding=1, pad_value=0.0)
    return (grid.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()).copy()


def class_resources(row: Mapping[str, Any] | None) -> ClassResources | None:
    """The class's totals from ``view_class_resources``. The numbers are sums of values the
    server bounded (sql/005_resources.sql); model names are typed by workers, so they pass
    through ``printable`` like every other string that reaches the screen."""
    if row is None:
        return None
    try:
        models = json.loads(row["gpu_models"] or "[]")
    except ValueError:
        models = []
    found = []
    for m in models[:8] if isinstance(models, list) else []:
        if not isinstance(m, dict) or not isinstance(m.get("count"), int) or m["count"] < 1:
            continue
        name = m.get("name")
        gib = m.get("gib")
        found.append(GpuModel(name=printable(name, 64) if isinstance(name, str) and name else None,
                             memory_gib=gib if isinstance(gib, int) and gib > 0 else None, count=m["count"]))
    workers = max(int(row["workers"] or 0), 0)
    return ClassResources(
        workers=workers, unreported=max(workers - int(row["reporting"] or 0), 0),
        cpu_cores=max(int(row["cpu_cores"] or 0), 0), gpus=max(int(row["gpus"] or 0), 0),
        gpu_memory_bytes=max(int(row["gpu_memory_bytes"] or 0), 0), gpu_models=tuple(found))


def _worker_rows(rows: list[Any]) -> tuple[WorkerRow, ...]:
    total_images = sum(int(r["images_done"]) for r in rows) or 1
    workers = []
    for r in rows:
        state = r["state"]
        if state != WorkerState.OFFLINE and r["last_seen_s"] > STALE_AFTER_S:
            state = STALE
        if r["quarantined"]:
            state = QUARANTINED  # gets no more units: its results were refused or disagreed
        alive = max(1e-6, float(r["alive_s"] or 0))
        workers.append(WorkerRow(
            name=printable(r["name"], 64), device=printable(r["device"], 32), state=state,
            units_done=int(r["units_done"]),
            images_done=int(r["images_done"]), images_per_s=float(r["images_done"]) / alive if alive > 1 else 0.0,
            share=int(r["images_done"]) / total_images, last_seen_s=max(0.0, float(r["last_seen_s"])),
        ))
    return tuple(workers)


async def read_snapshot(
    db: Database,
    *,
    title: str,
    run_id: int | None = None,
    max_steps: int | None = None,
    sample: np.ndarray | None = None,
    leaderboard: bool = False,
) -> ClusterSnapshot:
    started = time.perf_counter()
    await db.fetchval("ping")
    latency_ms = (time.perf_counter() - started) * 1000
    run = await db.fetchrow("view_run", run_id) if run_id is not None else await db.fetchrow("view_active_run")
    if run is None:
        run = await db.fetchrow("view_latest_run")
    # The class's hardware: everyone online, whatever run they are on (students waiting for
    # the first run too), so it is read before the run.
    resources = class_resources(await db.fetchrow("view_class_resources"))
    if run is None:
        # Before the first run: the students already waiting (the header counts them).
        return ClusterSnapshot(
            title=title, run_id=None, status="waiting for a run", step=0, max_steps=max_steps, epoch=0,
            epoch_fraction=0.0, images_per_s=0.0, effective_batch=0, since_last_step_s=None, eta_s=None,
            db_ok=True, db_latency_ms=latency_ms, workers=_worker_rows(await db.fetch("dashboard_workers", None)),
            history=(), events=(), sample=sample, leaderboard=leaderboard, resources=resources,
        )
    cfg = TrainConfig.from_json(run["config"])
    rid = run["id"]
    workers = _worker_rows(await db.fetch("dashboard_workers", rid))
    metrics = await db.fetch("recent_metrics", rid, HISTORY_STEPS)
    events = await db.fetch("recent_events", rid, EVENT_LINES)

    steps = [m for m in metrics if m["step"] >= 1 and m["images"] > 0]
    rate = 0.0
    step_time = None
    if len(steps) >= 2:
        span = steps[-1]["at"] - steps[0]["at"]
        if span > 0:
            rate = sum(m["images"] for m in steps[1:]) / span
            step_time = span / (len(steps) - 1)
    since_last = float(steps[-1]["age_s"]) if steps else None
    step = int(run["step"])
    eta = None
    if max_steps is not None and step_time is not None and run["status"] == "running":
        eta = max(0, max_steps - step) * step_time
    position = int(run["images_seen"])  # how far into the data the run is
    size = int(run["dataset_size"])
    # Images a step (round) holds: with --units-per-step auto it follows the class size.
    per_step = int(steps[-1]["images"]) if steps else max(1, cfg.units_per_step) * cfg.images_per_unit
    return ClusterSnapshot(
        title=title, run_id=rid, status=run["status"], step=step, max_steps=max_steps,
        epoch=position // size, epoch_fraction=(position % size) / size, images_per_s=rate,
        effective_batch=per_step, since_last_step_s=since_last, eta_s=eta,
        db_ok=True, db_latency_ms=latency_ms, workers=tuple(workers),
        history=tuple(StepPoint(step=m["step"], g_loss=m["g_loss"], d_loss=m["d_loss"], d_x=m["d_x"],
                                d_g_z=m["d_g_z"], swd=m["swd"]) for m in metrics),
        events=tuple(EventLine(age_s=float(e["age_s"]), kind=printable(e["kind"], 16),
                               message=printable(e["message"], 300)) for e in events),
        sample=sample, leaderboard=leaderboard, resources=resources,
    )


def starting_snapshot(title: str, status: str = "starting") -> ClusterSnapshot:
    return ClusterSnapshot(
        title=title, run_id=None, status=status, step=0, max_steps=None, epoch=0, epoch_fraction=0.0,
        images_per_s=0.0, effective_batch=0, since_last_step_s=None, eta_s=None, db_ok=True,
        db_latency_ms=None, workers=(), history=(), events=(),
    )


def plain_line(snap: ClusterSnapshot) -> str:
    """One greppable line per update, for `watch` when stdout is not a terminal."""
    workers = " ".join(f"{w.name}={w.state}/{w.images_done}" for w in snap.workers)
    total = f"/{snap.max_steps}" if snap.max_steps else ""
    res = snap.resources
    hardware = (f"online={res.workers} cores={res.cpu_cores} gpus={res.gpus} "
                f"gpu_mem_gib={res.gpu_memory_bytes / 2**30:.0f} ") if res is not None else ""
    return (f"run={snap.run_id} status={snap.status} step={snap.step}{total} epoch={snap.epoch} "
            f"img_per_s={snap.images_per_s:.1f} db={'ok' if snap.db_ok else 'down'} {hardware}workers=[{workers}]")


def offline_snapshot(previous: ClusterSnapshot | None, title: str) -> ClusterSnapshot:
    """What to show while the database is unreachable: the last picture, marked DOWN."""
    if previous is None:
        return ClusterSnapshot(
            title=title, run_id=None, status="database unreachable", step=0, max_steps=None, epoch=0,
            epoch_fraction=0.0, images_per_s=0.0, effective_batch=0, since_last_step_s=None, eta_s=None,
            db_ok=False, db_latency_ms=None, workers=(), history=(), events=(),
        )
    from dataclasses import replace

    return replace(previous, db_ok=False, db_latency_ms=None)


class SnapshotFeeder:
    """Keeps ``latest`` fresh: re-reads on notifications (coalesced), and every ``liveness_s``."""

    def __init__(self, url: str, *, title: str, leaderboard: bool = False, max_steps: int | None = None,
                 run_id: Callable[[], int | None] = lambda: None, min_interval_s: float = 0.5,
                 liveness_s: float = 10.0, samples_from_db: bool = False) -> None:
        self.url = url
        self.title = title
        self.leaderboard = leaderboard
        self.max_steps = max_steps
        self.run_id = run_id
        self.min_interval_s = min_interval_s
        self.liveness_s = liveness_s
        self.samples_from_db = samples_from_db
        self.sample_every_s = 10.0  # decoding weights and sampling costs CPU the trainers want
        self._sampled_at = 0.0
        self.sample: np.ndarray | None = None
        self.latest: ClusterSnapshot | None = None
        self.updated = asyncio.Event()  # test signal
        self._changed = asyncio.Event()
        self._weights_changed = asyncio.Event()
        self._sample_version: tuple[int, int] | None = None

    def _notify(self, channel: str, _payload: str) -> None:
        if channel == WEIGHTS_CHANNEL:
            self._weights_changed.set()
        self._changed.set()

    async def run(self) -> None:
        # pg_stat_activity shows "ganns-async watch" or "ganns-async coordinator" (its dashboard).
        app = f"ganns-async {self.title}"
        db = await Database.open(self.url, max_size=2, application_name=app)
        listener = Listener(self.url, [WORKERS_CHANNEL, WEIGHTS_CHANNEL, CONTROL_CHANNEL, EVENTS_CHANNEL],
                            self._notify, self._changed.set, application_name=app)
        try:
            await listener.start()
            self._weights_changed.set()
            while True:
                self._changed.clear()
                try:
                    due = time.monotonic() - self._sampled_at >= self.sample_every_s
                    if self.samples_from_db and self._weights_changed.is_set() and due:
                        self._weights_changed.clear()
                        self._sampled_at = time.monotonic()
                        await self._refresh_sample(db)
                    self.latest = await read_snapshot(
                        db, title=self.title, run_id=self.run_id(), max_steps=self.max_steps,
                        sample=self.sample, leaderboard=self.leaderboard)
                except CONNECTION_ERRORS:
                    self.latest = offline_snapshot(self.latest, self.title)
                self.updated.set()
                await asyncio.sleep(self.min_interval_s)  # coalesce bursts of notifications
                await wait_event(self._changed, self.liveness_s)
        finally:
            await listener.close()
            await db.close()

    async def _refresh_sample(self, db: Database) -> None:
        """Faces from the newest published weights (read-only views have no model of their own)."""
        run = await db.fetchrow("view_active_run") or await db.fetchrow("view_latest_run")
        if run is None or (run["id"], run["step"]) == self._sample_version:
            return
        blob = await db.fetchval("view_weights", run["id"], run["step"])
        if blob is None:
            return
        cfg = TrainConfig.from_json(run["config"])
        try:
            cfg.check()  # its width sizes the networks built here
        except (ValueError, TypeError):
            return

        def render() -> np.ndarray:
            g, d = Generator(feature_maps=cfg.feature_maps), Discriminator(feature_maps=cfg.feature_maps)
            tensors, _ = codec.decode_tensors(blob, expected=codec.tensor_spec(state_tensors(g, d)))
            load_state_tensors(g, d, tensors)
            return preview_image(g, cfg.seed)

        self.sample = await asyncio.to_thread(render)
        self._sample_version = (run["id"], run["step"])
