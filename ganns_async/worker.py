"""The worker: wake on a notification, claim a unit, compute its gradients, store them.

One asyncio loop. The loop only talks to PostgreSQL; image decoding, forward/backward
passes and payload encoding run on one dedicated compute thread, so heartbeats and
notifications keep flowing while a unit is computed.

Work is driven by NOTIFY (``ganns_units``, ``ganns_control``, ``ganns_weights``). The only
periodic traffic of an idle worker is its heartbeat (every ``heartbeat_s``) and a safety
sweep (every ``sweep_s``) that looks for work once in case a notification was lost
while the listener was reconnecting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import getpass
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import torch

from ganns_async import codec
from ganns_async.data import ImageDataset
from ganns_async.db import (
    CONNECTION_ERRORS,
    CONTROL_CHANNEL,
    UNITS_CHANNEL,
    WEIGHTS_CHANNEL,
    Database,
    Listener,
)
from ganns_async.errors import UserError
from ganns_async.hardware import cpu_info, gpu_info, pick_device, resources
from ganns_async.migrate import require_migrated
from ganns_async.model import build_models
from ganns_async.retry import Backoff, SideTasks, describe_error
from ganns_async.states import WorkerState
from ganns_async.store import RunRow, UnitRow, WorkerStore
from ganns_async.terminal import printable
from ganns_async.training import (
    TrainConfig,
    load_state_tensors,
    run_local_unit,
    run_unit,
    state_tensors,
)
from ganns_async.waiting import wait_event

log = logging.getLogger("ganns_async.worker")


@dataclass
class WorkerOptions:
    db_url: str
    data: str
    name: str | None = None
    device: str = "auto"
    batch_size: int | None = None  # micro-batch for small devices; None = whole unit
    threads: int | None = None
    lease_s: float = 60.0
    heartbeat_s: float = 10.0
    sweep_s: float = 30.0


def default_name() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        user = "worker"
    return f"{user}@{socket.gethostname()}"


@dataclass
class WorkerStatus:
    """A snapshot for dashboards and log lines."""

    name: str = ""
    device: str = ""
    connection: str = "connecting"
    run_id: int | None = None
    state: WorkerState = WorkerState.WAITING
    unit_id: int | None = None
    unit_step: int | None = None
    units_done: int = 0
    images_done: int = 0
    images_per_s: float = 0.0
    recent: deque[dict[str, float]] = field(default_factory=lambda: deque(maxlen=20))
    message: str = ""
    unit_started: float | None = None  # time.monotonic() when the current unit was claimed
    last_unit_s: float | None = None  # how long the previous unit took (progress estimate)
    rank: int | None = None
    workers_total: int | None = None


class Worker:
    def __init__(self, opts: WorkerOptions, *, on_status: Callable[[WorkerStatus], None] | None = None) -> None:
        self.opts = opts
        self.on_status = on_status
        self.status = WorkerStatus(name=opts.name or default_name())
        self.wake = asyncio.Event()
        self.weights_published = asyncio.Event()
        self.worker_id: int | None = None
        self.db: Database | None = None
        self.listener: Listener | None = None
        self.dataset: ImageDataset | None = None
        self._unit: UnitRow | None = None  # the claimed unit, while we hold its lease
        self._in_hand: UnitRow | None = None  # claimed and not yet stored, released or reported
        self._orphan: UnitRow | None = None  # in hand when the connection was lost: give it back
        # (run_id, version, published at) loaded into the models: a rewound run (--resume
        # after --state-every) publishes a version again, and it must be fetched again.
        self._held: tuple[int, int, Any] | None = None
        self.feature_maps: int | None = None  # the width of the networks, built on joining a run
        self._joined_run: int | None = None
        self._db_written: WorkerState | None = None  # the state the workers table holds
        self.side = SideTasks(log)  # heartbeat, listener: the worker stops if one dies
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.ready = asyncio.Event()  # test signal: registered and listening

    # --- plumbing --------------------------------------------------------------------

    def _notify(self, channel: str, payload: str) -> None:
        if channel == WEIGHTS_CHANNEL:
            self.weights_published.set()
        self.wake.set()

    def _reconnected(self) -> None:
        self.status.connection = "connected"
        self.wake.set()

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _publish_status(self, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(self.status, k, v)
        if self.on_status is not None:
            self.on_status(self.status)

    async def _set_state(self, state: WorkerState, **changes: Any) -> None:
        """Update the snapshot; write the state to the workers table when it changes (the
        table's trigger tells dashboards)."""
        self._publish_status(state=state, **changes)
        if self._db_written != state:
            assert self.worker_id is not None
            self._quarantined(await self.store.heartbeat(self.worker_id, state, self._joined_run))
            self._db_written = state

    async def _wait(self, timeout: float) -> None:
        """Sleep until a notification, or the safety sweep interval, whichever is first."""
        await wait_event(self.wake, timeout)

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> int:
        opts = self.opts
        if opts.threads:
            torch.set_num_threads(opts.threads)
        self.device = pick_device(opts.device)
        if self.device.type == "cuda":
            # Replication compares results: deterministic cuDNN kernels make two runs of a unit
            # on the same kind of GPU bitwise equal, at no measurable cost at 32 local steps
            # (H100: 1.23 vs 1.19-1.39 s a unit; scripts/bench_replica_tolerance.py). TF32 stays
            # on: its difference from a CPU is inside the tolerance (see replication.py).
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        from ganns_async.hub import resolve_data

        # `hf://OWNER/REPO/PATH` downloads once into the Hub cache (progress on stderr).
        local = await asyncio.to_thread(resolve_data, opts.data)
        self.dataset = await asyncio.to_thread(ImageDataset.open, local)
        if self.device.type != "cpu":
            # Registering reports the device's memory; initialise it here, off the loop. The
            # networks are built when a run is joined, at the run's width.
            await asyncio.to_thread(torch.zeros, 1, device=self.device)
        # Two connections per worker, whatever it does: this one for queries (the heartbeat
        # waits while a unit uploads) and the listener's. A class of 40 then needs 80.
        app = f"ganns-async worker {self.status.name}"
        self.db = await Database.open(opts.db_url, max_size=1, application_name=app)
        self.store = WorkerStore(self.db)
        try:
            await require_migrated(self.db)
            # The device is initialized by now: its facts cost nothing.
            self.worker_id, bound_name = await self.store.register(
                self.status.name, socket.gethostname(), str(self.device), cpu_info(), gpu_info(self.device),
                resources(self.device))
            # A student's worker is named after its login by the server, whatever --name said.
            self._publish_status(device=str(self.device), name=bound_name)
            log.info("worker %s (#%s) on %s joined; dataset %d images (%s)", self.status.name,
                     self.worker_id, self.device, len(self.dataset), self.dataset.fingerprint)
            self.listener = Listener(opts.db_url, [UNITS_CHANNEL, CONTROL_CHANNEL, WEIGHTS_CHANNEL],
                                     self._notify, self._reconnected, application_name=app)
            self.side.watch(await self.listener.start())
            self.side.start(self._heartbeat(), "heartbeat")
            self.ready.set()
            try:
                await self.side.guard(self._loop())
            finally:
                await self.side.cancel_all()
        finally:
            await self._shutdown()
        return 0

    async def _shutdown(self) -> None:
        """Give back a claimed unit at once (no lease to wait out) and say goodbye."""
        db = self.db
        if db is not None:
            with contextlib.suppress(Exception):
                if self.worker_id is not None:
                    # Gives back every claim, marks us offline and logs the goodbye, in one call.
                    for unit_id in await asyncio.wait_for(self.store.leave(self.worker_id), 5):
                        log.info("released unit %s", unit_id)
                    self._unit = None
        if self.listener is not None:
            await self.listener.close()
        if db is not None:
            await db.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.dataset is not None:
            self.dataset.close()

    async def _heartbeat(self) -> None:
        assert self.worker_id is not None
        while True:
            await asyncio.sleep(self.opts.heartbeat_s)
            try:
                self._quarantined(await self.store.heartbeat(self.worker_id, self.status.state, self._joined_run))
                unit = self._unit
                if unit is not None and not await self.store.extend_lease(unit.id, self.worker_id, self.opts.lease_s):
                    log.warning("lost the lease on unit %s (it will be recomputed elsewhere)", unit.id)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                # The next beat tries again; anything else is a bug, and SideTasks stops the
                # worker rather than let it lose every lease silently.
                log.warning("heartbeat failed: %s", describe_error(exc))
                self._publish_status(connection="reconnecting")

    def _quarantined(self, reason: str | None) -> None:
        """Say it once: a quarantined worker stays connected but gets no units."""
        if reason and not self.status.message.startswith("quarantined"):
            log.warning("this worker is quarantined by the coordinator (%s): it gets no more units; "
                        "ask your instructor", printable(reason, 200))
            self._publish_status(message=f"quarantined: {printable(reason, 200)}")

    async def _loop(self) -> None:
        backoff = Backoff()
        while True:
            try:
                await self._once()
                backoff.reset()
            except CONNECTION_ERRORS as exc:
                self._unit = None
                # Give it back once we are connected again, so nobody waits for its lease to
                # expire (if the lost reply was a stored result's, the release finds it done
                # and changes nothing).
                self._orphan, self._in_hand = self._in_hand or self._orphan, None
                self._db_written = None  # say our state again once back
                self._publish_status(connection="reconnecting")
                await backoff.wait(log, "database unavailable", exc)

    async def _once(self) -> None:
        """Find work and do one unit of it, or wait for a notification."""
        assert self.worker_id is not None and self.dataset is not None
        self.wake.clear()  # clear first: a notification arriving during the queries re-wakes us
        run = await self.store.active_run()
        self._publish_status(connection="connected")
        if self._orphan is not None:
            if await self.store.release(self._orphan.id, self.worker_id):
                log.info("gave back unit %s after the lost connection", self._orphan.id)
            self._orphan = None
        if run is None:
            if self.status.state != WorkerState.WAITING:
                log.info("no active run yet; waiting for the coordinator")
            await self._set_state(WorkerState.WAITING, run_id=None)
            await self._wait(self.opts.sweep_s)
            return
        if run.id != self._joined_run:
            await self._join(run)
        if run.status != "running":
            await self._set_state(WorkerState.PAUSED)
            await self._wait(self.opts.sweep_s)
            return
        unit = await self.store.claim(run.id, self.worker_id, self.opts.lease_s)
        if unit is None:
            await self._set_state(WorkerState.IDLE)
            await self._wait(self.opts.sweep_s)
            return
        self._unit = self._in_hand = unit
        # Not in a `finally`: if we are cancelled (Ctrl-C) mid-unit, _shutdown must still
        # see the unit to give it back at once.
        await self._process(run, unit)
        self._unit = self._in_hand = None

    async def _join(self, run: RunRow) -> None:
        assert self.dataset is not None and self.worker_id is not None
        if run.dataset_fingerprint != self.dataset.fingerprint:
            raise UserError(
                f"refusing to join run {run.id}: its dataset has {run.dataset_size} images "
                f"(fingerprint {run.dataset_fingerprint}), but --data {self.opts.data} has "
                f"{len(self.dataset)} (fingerprint {self.dataset.fingerprint}); use the same dataset as the coordinator"
            )
        cfg = TrainConfig.from_json(run.config)
        try:
            cfg.check()  # the width sizes what we allocate: never trust a number from the database
        except (ValueError, TypeError) as exc:
            raise UserError(f"refusing to join run {run.id}: its configuration is not one a coordinator makes ({exc})") from None
        self._joined_run = run.id
        self._cfg = cfg
        if self._cfg.feature_maps != self.feature_maps:
            await self._in_thread(self._build_models, self._cfg.feature_maps)
        # Counted as the run's worker at once (dashboards, the next round's width); the
        # server logs the join.
        await self.store.heartbeat(self.worker_id, self.status.state, run.id)
        log.info("joined run %s", run.id)

    def _build_models(self, feature_maps: int) -> None:
        """Networks of the run's width; the weights come with each unit's version."""
        self.g, self.d = build_models(0, feature_maps)
        self.g.to(self.device)
        self.d.to(self.device)
        self.feature_maps = feature_maps
        self.spec_state = codec.tensor_spec(state_tensors(self.g, self.d))
        self._held = None

    async def _process(self, run: RunRow, unit: UnitRow) -> None:
        assert self.worker_id is not None and self.dataset is not None
        started = time.perf_counter()
        await self._set_state(WorkerState.COMPUTING, unit_id=unit.id, unit_step=unit.step, run_id=run.id,
                              unit_started=time.monotonic())
        if not await self._ensure_weights(unit):
            # The version is gone (pruned while we claimed): give the unit back and
            # wait for the next published version instead of spinning on it.
            await self.store.release(unit.id, self.worker_id)
            self.weights_published.clear()
            await wait_event(self.weights_published, self.opts.sweep_s)
            return
        if not await self.store.extend_lease(unit.id, self.worker_id, self.opts.lease_s):
            # The heartbeat shares our one query connection, so it could not extend the
            # lease during a slow weights download; someone else has the unit by now.
            log.warning("lost the lease on unit %s while downloading weights; leaving it to others", unit.id)
            return
        t_weights = time.perf_counter()
        unusable = self._unusable(unit)
        if unusable is not None:
            # A bad unit must not take the worker down: say so, and let the coordinator decide.
            log.warning("unit %s cannot be computed here: %s; reported it", unit.id, unusable)
            self._unit = None
            await self.store.report_unusable(unit, self.worker_id, unusable)
            await self._set_state(WorkerState.IDLE, unit_id=None, unit_started=None)
            return
        blob, n, bad, metrics = await self._in_thread(self._compute, list(unit.indices), unit.noise_seed)
        t_computed = time.perf_counter()
        if bad:
            log.warning("unit %s: skipped %d unreadable image(s): %s", unit.id, len(bad), bad[:5])
        await self._set_state(WorkerState.UPLOADING)
        # The heartbeat stops extending the lease now: it queues behind the upload on our
        # one query connection and would otherwise find the unit already done. (Ctrl-C
        # still gives back every claim: _shutdown releases by worker, not by this field.)
        self._unit = None
        outcome = await self.store.submit(unit, self.worker_id, n, blob)
        if outcome == "lost":
            log.warning("unit %s was taken back before we finished (lease expired); result dropped", unit.id)
            return
        if outcome != "stored":
            log.warning("unit %s: the server %s", unit.id, printable(outcome, 300))
            await self._set_state(WorkerState.IDLE, unit_id=None, unit_started=None)
            return
        elapsed = time.perf_counter() - started
        rate = n / elapsed if elapsed > 0 else 0.0
        self.status.recent.append(metrics)
        self._publish_status(
            state=WorkerState.IDLE, unit_id=None, units_done=self.status.units_done + 1,
            images_done=self.status.images_done + n, images_per_s=rate,
            unit_started=None, last_unit_s=elapsed,
        )
        ranked = await self.store.rank(self.worker_id)
        if ranked is not None:
            self._publish_status(rank=ranked[0], workers_total=ranked[1])
        log.info("unit %s (step %s, v%s): %d images in %.2fs (%.1f img/s; weights %.2fs, compute %.2fs, "
                 "upload %.2fs) d_loss=%.3f g_loss=%.3f",
                 unit.id, unit.step, unit.version, n, elapsed, rate, t_weights - started, t_computed - t_weights,
                 time.perf_counter() - t_computed,
                 metrics.get("d_loss", float("nan")), metrics.get("g_loss", float("nan")))

    async def _ensure_weights(self, unit: UnitRow) -> bool:
        """Fetch and load the unit's weights version unless the models hold it already."""
        key = (unit.run_id, unit.version, unit.weights_at)
        if unit.weights_at is not None and self._held == key:
            return True
        blob = await self.store.weights(unit.run_id, unit.version)
        if blob is None:
            return False
        tensors, _meta = await self._in_thread(lambda: codec.decode_tensors(blob, expected=self.spec_state))
        await self._in_thread(load_state_tensors, self.g, self.d, tensors)
        self._held = key
        return True

    def _unusable(self, unit: UnitRow) -> str | None:
        """Why this unit cannot be computed on our dataset, or None. Units come from the
        database: an index out of range would otherwise crash every worker that claims it."""
        assert self.dataset is not None
        n = len(self.dataset)
        expected = self._cfg.images_per_unit
        if not unit.indices or len(unit.indices) > expected:
            return f"{len(unit.indices)} images in a unit of at most {expected}"
        low, high = min(unit.indices), max(unit.indices)
        if low < 0 or high >= n:
            return f"image index {low if low < 0 else high} outside the dataset's 0..{n - 1}"
        if not 0 <= unit.noise_seed < 2**63:
            return f"noise seed {unit.noise_seed} out of range"
        return None

    def _compute(self, indices: list[int], noise_seed: int) -> tuple[bytes, int, list[int], dict[str, float]]:
        """Runs on the compute thread: load images, forward/backward (H local steps on a copy
        of the models in local mode), encode."""
        assert self.dataset is not None
        if self._cfg.local:
            # A GPU trains faster than one core decodes images: decode ahead on a few threads.
            load_threads = 0 if self.device.type == "cpu" else min(4, os.cpu_count() or 1)
            result, bad = run_local_unit(self.g, self.d, self.dataset, indices, noise_seed, self._cfg,
                                         micro_batch=self.opts.batch_size, load_threads=load_threads)
        else:
            result, bad = run_unit(self.g, self.d, self.dataset, indices, noise_seed,
                                   micro_batch=self.opts.batch_size)
        blob = codec.encode_tensors(
            result.tensors(), meta={"n_samples": result.n_samples, "metrics": result.metrics,
                                    "skipped": len(bad)},
            float_dtype=self._cfg.grad_dtype,
        )
        return blob, result.n_samples, bad, result.metrics


def worker_snapshot(status: WorkerStatus, message: str = "") -> Any:
    """The worker dashboard's snapshot, from the worker's in-memory status."""
    from ganns_async.dashboard import WorkerSnapshot

    progress = None
    if status.unit_started is not None:
        expected = status.last_unit_s or 10.0
        progress = min(0.95, (time.monotonic() - status.unit_started) / expected)
        if status.state == WorkerState.UPLOADING:
            progress = max(progress, 0.95)
    return WorkerSnapshot(
        name=printable(status.name, 64), device=printable(status.device, 32), connection=status.connection,
        run_id=status.run_id,
        state=status.state, unit_id=status.unit_id, unit_step=status.unit_step, unit_progress=progress,
        units_done=status.units_done, images_done=status.images_done, images_per_s=status.images_per_s,
        rank=status.rank, workers_total=status.workers_total,
        recent_losses=tuple((m.get("d_loss", float("nan")), m.get("g_loss", float("nan"))) for m in status.recent),
        message=printable(message or status.message, 300),
    )
