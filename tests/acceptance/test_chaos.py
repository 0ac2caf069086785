"""The chaos suite: a real run hit by faults ends where the single-process run ends.

Units are deterministic and ``train-local`` is exact, so the strongest check there is
applies: a synchronous fp32 run (``--max-staleness 0``) hit by a fault must end with the
model bit for bit equal to ``train-local``'s, with every image counted exactly once (the
checkpoint's and the run's ``images_seen``, and every step's row in ``metrics``: all of its
units, none twice).

Each test gets a PostgreSQL of its own (it may be restarted or crashed) and two cutting
proxies: the coordinator talks to the server through one, the workers through the other, so
a fault can be aimed at an upload, a download or a publish. Coordinator and workers are the
real CLI in subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import torch

# pytest puts tests/acceptance (it has no __init__.py) on sys.path
import forkserver
from chaos import CutProxy, PrivateServer
from helpers import SPACE_AGAIN, Process, disk_full_sql
from ganns_async.local import LocalOptions, train_local
from ganns_async.migrate import migrate
from ganns_async.model_card import discriminator_parameters, generator_parameters
from ganns_async.training import TrainConfig

REPO = Path(__file__).resolve().parents[2]
SEED, UNIT, UNITS_PER_STEP, STEPS = 7, 8, 2, 4
IMAGES = STEPS * UNITS_PER_STEP * UNIT
# A narrow DCGAN (--feature-maps 16: a ninth of the compute and of the bytes): every fault
# here is in the protocol, which does not care how wide the networks are.
WIDTH = 16
# A result or a weights version in fp32: what a cut "in the middle" aims at.
MODEL_BYTES = 4 * (generator_parameters(WIDTH) + discriminator_parameters(WIDTH))
COORDINATOR_ARGS = [
    "--no-tui", "--max-staleness", "0", "--grad-dtype", "fp32", "--seed", str(SEED), "--unit-size", str(UNIT),
    "--feature-maps", str(WIDTH),
    "--units-per-step", str(UNITS_PER_STEP), "--local-steps", "1", "--max-steps", str(STEPS),
    "--checkpoint-every", str(STEPS), "--eval-every", "0", "--spot-check", "0", "--sweep-seconds", "2",
    "--step-timeout", "600",  # a step never closes short: each must have all its units
]
WORKER_ARGS = ["--no-tui", "--threads", "1", "--lease-seconds", "10", "--heartbeat-seconds", "2",
               "--sweep-seconds", "3"]
LOCK_KEY = 72184555  # queries.sql: try_lock_run

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow(5)]


@pytest.fixture(scope="module")
def expected(synth_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """What train-local ends with: the model every chaos run must end with, bit for bit."""
    threads = torch.get_num_threads()
    try:
        cfg = TrainConfig(seed=SEED, unit_size=UNIT, units_per_step=UNITS_PER_STEP, max_staleness=0,
                          grad_dtype="fp32", feature_maps=WIDTH)
        result = train_local(LocalOptions(data=str(synth_zip), max_steps=STEPS, config=cfg, checkpoint_every=STEPS,
                                          out=tmp_path_factory.mktemp("local"), threads=1))
    finally:
        torch.set_num_threads(threads)
    assert result.trainer.g_ema is not None
    return {**{f"G.{k}": v.clone() for k, v in result.trainer.g.state_dict().items()},
            **{f"D.{k}": v.clone() for k, v in result.trainer.d.state_dict().items()},
            **{f"EMA.{k}": v.clone() for k, v in result.trainer.g_ema.state_dict().items()}}


async def _create_chaos_database(srv: PrivateServer) -> None:
    conn = await asyncpg.connect(srv.url)
    try:
        await conn.execute("CREATE DATABASE chaos")
    finally:
        await conn.close()
    await migrate(srv.url_for("chaos"))


@pytest.fixture(scope="session")
def migrated_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A server's data directory with the ``chaos`` database migrated. Each test's server
    starts from a copy of it: initdb and the migration run once (per xdist process), not
    once a test."""
    with PrivateServer() as srv:
        asyncio.run(_create_chaos_database(srv))
        return srv.save_data(tmp_path_factory.mktemp("chaos-template") / "data")


class Cluster:
    """A private server with the ``chaos`` database, two proxies, and the processes of one run."""

    def __init__(self, srv: PrivateServer, data: Path, tmp: Path) -> None:
        self.srv, self.data, self.tmp = srv, data, tmp
        self.out = tmp / "out"
        self.coordinator_proxy = CutProxy(srv.socket_path)
        self.worker_proxy = CutProxy(srv.socket_path)
        self.direct = srv.url_for("chaos")
        self.coordinator: Process | None = None
        self.workers: dict[str, Process] = {}
        self._procs: list[Process] = []

    def _spawn(self, log: str, *args: str) -> Process:
        with open(self.tmp / f"{log}.log", "ab") as fh:
            proc = forkserver.popen(["-m", "ganns_async", *args], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._procs.append(proc)
        return proc

    def start_coordinator(self, *extra: str, log: str = "coordinator") -> Process:
        self.coordinator = self._spawn(log, "coordinator", "--db", self.coordinator_proxy.url_for("chaos"),
                                       "--data", str(self.data), "--out", str(self.out), *COORDINATOR_ARGS, *extra)
        return self.coordinator

    def start_workers(self, *names: str) -> None:
        for name in names:
            self.workers[name] = self._spawn(name, "worker", "--db", self.worker_proxy.url_for("chaos"),
                                             "--data", str(self.data), "--name", name, *WORKER_ARGS)

    @contextlib.contextmanager
    def hold(self, *names: str) -> Iterator[None]:
        """Workers ``names`` stopped (SIGSTOP) while the body runs, then continued. The narrow
        DCGAN trains a step in a fraction of a second; with the workers held, the run cannot
        finish (at most the step whose results are already in completes) before a fault is
        in place."""
        for name in names:
            self.workers[name].send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for name in names:
                self.workers[name].send_signal(signal.SIGCONT)

    def log(self, name: str = "coordinator") -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """A direct query; waits out a server that is restarting."""
        async def go() -> list[asyncpg.Record]:
            for _ in range(300):
                try:
                    conn = await asyncpg.connect(self.direct, timeout=5)
                except (OSError, asyncpg.PostgresError):
                    await asyncio.sleep(0.1)  # the test's own server is coming back up
                    continue
                try:
                    return await conn.fetch(sql, *args)
                finally:
                    await conn.close()
            raise AssertionError("the server did not come back")

        return asyncio.run(go())

    def execute_ddl(self, sql: str) -> None:
        """Direct SQL, several statements in one transaction, that must lock the run's tables.
        A process of the run may hold one of them and want another: rather than wait for the
        lock (and become half of a deadlock), give up after a moment and try again."""
        async def go() -> None:
            conn = await asyncpg.connect(self.direct, timeout=5)
            try:
                await conn.execute("SET lock_timeout = '200ms'")
                for _ in range(100):
                    try:
                        await conn.execute(sql)  # one implicit transaction
                        return
                    except asyncpg.exceptions.LockNotAvailableError:
                        await asyncio.sleep(0.05)
                raise AssertionError("the run's tables stayed locked")
            finally:
                await conn.close()

        asyncio.run(go())

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.coordinator is not None and self.coordinator.poll() is not None:
                raise AssertionError(f"the coordinator exited ({self.coordinator.returncode}) waiting for {what}:\n"
                                     + self.log()[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n" + self.log()[-4000:])
            time.sleep(0.1)

    def step(self) -> int:
        rows = self.query("SELECT step FROM runs ORDER BY id DESC LIMIT 1")
        return int(rows[0]["step"]) if rows else -1

    def wait_step(self, target: int) -> None:
        self.wait_until(f"step {target}", lambda: self.step() >= target)

    def events(self, kind: str) -> list[str]:
        return [r["message"] for r in self.query("SELECT message FROM events WHERE kind = $1 ORDER BY id", kind)]

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self._procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.coordinator_proxy.close()
        self.worker_proxy.close()

    def assert_exact(self, expected: dict[str, torch.Tensor], *, timeout: float = 300) -> None:
        """The run finished, equal to train-local bit for bit, every image counted once."""
        assert self.coordinator is not None
        rc = self.coordinator.wait(timeout)
        assert rc == 0, self.log()[-6000:]
        ckpt = torch.load(self.out / "checkpoint_latest.pth", map_location="cpu", weights_only=True)
        assert ckpt["step"] == STEPS and ckpt["images_seen"] == IMAGES
        got = {**{f"G.{k}": v for k, v in ckpt["generator_raw_state_dict"].items()},
               **{f"D.{k}": v for k, v in ckpt["discriminator_state_dict"].items()},
               **{f"EMA.{k}": v for k, v in ckpt["generator_state_dict"].items()}}
        assert got.keys() == expected.keys()
        diff = max(float((got[k].double() - expected[k].double()).abs().max()) for k in got)
        assert diff == 0.0, f"max |difference| from train-local: {diff:.3g}"
        runs = [tuple(r) for r in self.query("SELECT step, status, images_seen FROM runs")]
        assert runs == [(STEPS, "done", IMAGES)]
        steps = [tuple(r) for r in self.query("SELECT step, images, units FROM metrics WHERE step >= 1 ORDER BY step")]
        assert steps == [(s, UNITS_PER_STEP * UNIT, UNITS_PER_STEP) for s in range(1, STEPS + 1)]


@pytest.fixture
def cluster(synth_zip: Path, tmp_path: Path, migrated_data_dir: Path) -> Iterator[Cluster]:
    with PrivateServer(template=migrated_data_dir) as srv:
        c = Cluster(srv, synth_zip, tmp_path)
        try:
            yield c
        finally:
            c.close()


def test_no_fault_baseline(cluster: Cluster, expected: dict[str, torch.Tensor]) -> None:
    """The harness itself: through the proxies, with nothing going wrong."""
    cluster.start_coordinator()
    cluster.start_workers("w1", "w2")
    cluster.assert_exact(expected)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restart(cluster: Cluster, expected: dict[str, torch.Tensor], mode: str) -> None:
    """PostgreSQL restarts (fast: a clean shutdown; immediate: a crash) under a running class.
    Every connection, the run lock's too, is lost and comes back."""
    cluster.start_coordinator()
    cluster.start_workers("w1", "w2")
    cluster.wait_step(1)
    with cluster.hold("w1", "w2"):
        cluster.srv.restart(mode)  # type: ignore[arg-type]
    cluster.assert_exact(expected)
    assert "run lock taken again" in cluster.log()


def test_crash_loses_stored_results_which_are_computed_again(cluster: Cluster,
                                                             expected: dict[str, torch.Tensor]) -> None:
    """A crash while results wait in the UNLOGGED gradients table: their units are marked done
    but the results are gone. The running coordinator requeues them as soon as it reconnects."""
    coordinator = cluster.start_coordinator()
    cluster.start_workers("w1", "w2")
    cluster.wait_step(1)
    coordinator.send_signal(signal.SIGSTOP)  # results pile up, nobody folds them
    try:
        cluster.wait_until("stored results", lambda: cluster.query("SELECT count(*) FROM gradients")[0][0] >= 1)
        cluster.srv.restart("immediate")
        assert cluster.query("SELECT count(*) FROM gradients")[0][0] == 0  # what the crash did
        assert cluster.query("SELECT count(*) FROM work_units WHERE state = 'done'")[0][0] >= 1
    finally:
        coordinator.send_signal(signal.SIGCONT)
    cluster.assert_exact(expected)
    assert any("lost with the database server's restart" in m for m in cluster.events("requeue"))


def test_cut_in_the_middle_of_an_upload(cluster: Cluster, expected: dict[str, torch.Tensor]) -> None:
    cluster.start_coordinator()
    cluster.wait_step(0)
    cut = cluster.worker_proxy.cut_after("up", MODEL_BYTES // 2)  # workers send that much only as results
    cluster.start_workers("w1", "w2")
    cluster.assert_exact(expected)
    assert cut.fired.is_set()
    # The cut worker gave its unit back on reconnecting instead of letting the lease run out.
    assert any("gave back unit" in cluster.log(w) for w in ("w1", "w2"))


def test_cut_in_the_middle_of_a_weights_download(cluster: Cluster, expected: dict[str, torch.Tensor]) -> None:
    cluster.start_coordinator()
    cluster.wait_step(0)
    cut = cluster.worker_proxy.cut_after("down", MODEL_BYTES // 2)  # workers receive that much only as weights
    cluster.start_workers("w1", "w2")
    cluster.assert_exact(expected)
    assert cut.fired.is_set()


@pytest.mark.parametrize("where", ["before the commit", "after the commit"])
def test_cut_in_the_middle_of_a_publish(cluster: Cluster, expected: dict[str, torch.Tensor], where: str) -> None:
    """The coordinator loses its connection as it commits a step's announcement: before the
    server has the COMMIT (rolled back), or after (committed, but the reply is lost, so the
    coordinator cannot know). Either way it retries, and the retry changes nothing twice."""
    cluster.start_coordinator()
    cluster.start_workers("w1", "w2")
    cluster.wait_step(1)
    with cluster.hold("w1", "w2"):
        if where == "before the commit":
            cut = cluster.coordinator_proxy.cut_when(lambda d, chunk, _c: d == "up" and b"COMMIT" in chunk)
        else:
            cut = cluster.coordinator_proxy.cut_when(lambda d, chunk, _c: d == "down" and b"COMMIT\x00" in chunk)
    cluster.assert_exact(expected)
    assert cut.fired.is_set()
    assert "publishing step" in cluster.log()  # the retry said so


@pytest.mark.parametrize("where", ["reply to creating the run", "writing the first weights"])
def test_cut_while_the_coordinator_starts(cluster: Cluster, expected: dict[str, torch.Tensor], where: str) -> None:
    """Start-up retries too. The harder case: the run's INSERT commits but its reply is lost,
    so the coordinator cannot know the run exists; its retry must find that run instead of
    leaving it behind and making another (assert_exact checks there is exactly one run)."""
    if where == "reply to creating the run":
        # The first run row to come down is create_run's reply (the database has no run
        # before it); the server sends it with ReadyForQuery, after the commit.
        cut = cluster.coordinator_proxy.cut_when(lambda d, chunk, _c: d == "down" and b'"max_staleness"' in chunk)
    else:
        cut = cluster.coordinator_proxy.cut_when(lambda d, chunk, _c: d == "up" and b"INSERT INTO weights" in chunk)
    cluster.start_coordinator()
    cluster.start_workers("w1", "w2")
    cluster.assert_exact(expected)
    assert cut.fired.is_set()
    assert ("creating the run: database unavailable" if where.startswith("reply") else
            "writing the first weights: database unavailable") in cluster.log()


def test_coordinator_killed_in_the_middle_of_a_publish_then_resumed(cluster: Cluster,
                                                                   expected: dict[str, torch.Tensor]) -> None:
    coordinator = cluster.start_coordinator()
    cluster.start_workers("w1", "w2")
    cluster.wait_step(1)

    def kill_at_commit(direction: str, chunk: bytes, _conn: object) -> bool:
        if direction == "up" and b"COMMIT" in chunk:
            coordinator.send_signal(signal.SIGKILL)  # weights written, announcement in flight
            return True
        return False

    with cluster.hold("w1", "w2"):
        cut = cluster.coordinator_proxy.cut_when(kill_at_commit)
    assert coordinator.wait(180) == -signal.SIGKILL
    assert cut.fired.is_set()
    # And the resume itself loses its connection as it rewinds (the start-up retries it whole).
    rewind = cluster.coordinator_proxy.cut_when(
        lambda d, chunk, _c: d == "up" and b"DELETE FROM work_units WHERE run_id = $1 AND step >=" in chunk)
    cluster.start_coordinator("--resume", log="resumed")
    cluster.assert_exact(expected)
    assert rewind.fired.is_set()
    assert "resuming the run: database unavailable" in cluster.log("resumed")
    assert "resumed at step" in cluster.log("resumed")


def test_worker_killed_in_the_middle_of_a_unit(cluster: Cluster, expected: dict[str, torch.Tensor]) -> None:
    cluster.start_coordinator()
    cluster.start_workers("w1", "w2")
    cluster.wait_step(1)
    with cluster.hold("w2"):  # w1 computes the rest alone, so the run waits for it
        cluster.wait_until("a worker computing", lambda: bool(
            cluster.query("SELECT 1 FROM workers WHERE state = 'computing' AND name = 'w1'")))
        cluster.workers["w1"].send_signal(signal.SIGKILL)
    cluster.assert_exact(expected)
    assert cluster.workers["w1"].wait(5) == -signal.SIGKILL


def test_notifications_lost_and_duplicated(cluster: Cluster, expected: dict[str, torch.Tensor]) -> None:
    """Half the notifications to every process never arrive; half of the rest arrive twice.
    Lost ones are caught up by the safety sweeps; doubled ones wake a process for nothing."""
    for proxy in (cluster.coordinator_proxy, cluster.worker_proxy):
        proxy.mangle_notifications(drop=0.5, duplicate=0.5, seed=1)
    cluster.start_coordinator()
    cluster.start_workers("w1", "w2")
    cluster.assert_exact(expected)
    for proxy in (cluster.coordinator_proxy, cluster.worker_proxy):
        assert proxy.notifications_dropped > 0 and proxy.notifications_doubled > 0


def test_output_folder_unwritable_for_a_while(cluster: Cluster, expected: dict[str, torch.Tensor]) -> None:
    """The folder becomes a file (chmod does not stop root): writing fails, an event says so,
    training goes on, and the files are written once the folder is back."""
    cluster.start_coordinator("--checkpoint-every", "1")
    cluster.wait_step(0)
    cluster.out.mkdir(exist_ok=True)
    aside = cluster.tmp / "out-aside"
    cluster.out.rename(aside)
    cluster.out.write_text("not a folder")
    cluster.start_workers("w1", "w2")
    cluster.wait_until("the event about the folder", lambda: any("cannot write" in m for m in cluster.events("files")))
    assert cluster.coordinator is not None and cluster.coordinator.poll() is None  # training goes on
    cluster.out.unlink()
    aside.rename(cluster.out)
    cluster.assert_exact(expected)
    assert any("written again" in m for m in cluster.events("files"))


# Every table a run writes: a full disk fails them all.
TABLES = ("runs", "weights", "workers", "work_units", "gradients", "rejections", "events", "metrics")


def test_database_disk_full_for_a_while(cluster: Cluster, expected: dict[str, torch.Tensor]) -> None:
    """Every write fails as on a full disk (SQLSTATE 53100) until every process has met it:
    each says so, backs off and retries instead of exiting, and once there is space again
    the run ends where train-local ends."""
    cluster.start_coordinator()
    cluster.start_workers("w1", "w2")
    cluster.wait_step(1)
    with cluster.hold("w1", "w2"):
        cluster.execute_ddl(disk_full_sql(*TABLES))
    cluster.wait_until("every process to meet the full disk", lambda: all(
        "DiskFullError: could not extend file" in cluster.log(name) for name in ("coordinator", "w1", "w2")))
    assert cluster.step() < STEPS
    cluster.execute_ddl(SPACE_AGAIN)
    cluster.assert_exact(expected)
    assert all(worker.poll() is None for worker in cluster.workers.values())  # nobody gave up


def test_run_lock_taken_by_a_rival_while_cut_off(cluster: Cluster, expected: dict[str, torch.Tensor]) -> None:
    """The coordinator's connections are cut and it stays cut off; meanwhile another session
    takes the run's lock. Coming back, the coordinator must not drive the run any more: it
    stops with one clear line. A --resume after the rival lets go finishes the run exactly."""
    coordinator = cluster.start_coordinator()
    cluster.start_workers("w1", "w2")
    cluster.wait_step(1)
    run_id = cluster.query("SELECT id FROM runs")[0]["id"]

    async def rival() -> int:
        cluster.coordinator_proxy.refuse(6)
        cluster.coordinator_proxy.cut_all()
        conn = await asyncpg.connect(cluster.direct)
        for _ in range(100):  # the cut session lets go of the lock within moments
            if await conn.fetchval("SELECT pg_try_advisory_lock($1, $2::integer)", LOCK_KEY, run_id):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the rival never got the lock")
        rc = await asyncio.to_thread(coordinator.wait, 120)
        await conn.close()  # the rival lets go
        return rc

    with cluster.hold("w1", "w2"):
        rc = asyncio.run(rival())
    assert rc != 0
    assert "is now coordinated by another process" in cluster.log()
    assert cluster.query("SELECT status FROM runs")[0]["status"] == "running"  # not paused by the loser
    cluster.start_coordinator("--resume", log="resumed")
    cluster.assert_exact(expected)
