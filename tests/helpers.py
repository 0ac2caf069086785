"""Helpers the tests of every tier import (``from helpers import ...``).

A plain module, not a conftest: a tier may have a ``conftest.py`` of its own (tests/unit/
has), and pytest would make ``from conftest import`` mean whichever was imported last. ``tests/`` is on
``sys.path`` through ``pythonpath = ["tests"]`` in pyproject.toml. The fixtures themselves
live in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import torch

import forkserver
from forkserver import ForkedProcess

REPO = Path(__file__).resolve().parent.parent  # the repository's root


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# --- databases and logins -------------------------------------------------------------


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


async def _create_db(server_url: str, name: str, template: str | None = None) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    finally:
        await conn.close()


async def _drop_db(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


@contextlib.contextmanager
def fresh_database(server_url: str, template: str | None = None) -> Iterator[str]:
    """A fresh database on ``server_url`` (empty, or a copy of database ``template``),
    dropped afterwards."""
    name = f"ganns_test_{uuid.uuid4().hex[:12]}"
    _run(_create_db(server_url, name, template))
    try:
        yield with_database(server_url, name)
    finally:
        _run(_drop_db(server_url, name))


@dataclass
class ClassLogins:
    """Logins of a class (sql/003_roles.sql): URLs for the admin (the migrating superuser), an
    instructor, three students and a viewer."""

    admin: str
    instructor: str
    alice: str
    bob: str
    mallory: str
    viewer: str
    names: list[str]

    def url(self, who: str) -> str:
        return getattr(self, who)


async def _make_logins(admin: str, tag: str) -> ClassLogins:
    from ganns_async.logins import add_login

    kinds = [("teacher", "instructor"), ("alice", "student"), ("bob", "student"), ("mallory", "student"),
             ("viewer", "viewer")]
    names = [f"t{tag}_{who}" for who, _ in kinds]
    # With passwords, as `db add-student` makes them: a DATABASE_URL server may check them.
    urls = [await add_login(admin, name, role) for name, (_, role) in zip(names, kinds)]
    return ClassLogins(admin, *urls, names=names)


async def drop_logins(admin: str, names: list[str]) -> None:
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY($1::text[])",
                           names)
        for name in names:
            await conn.execute(f'DROP ROLE IF EXISTS "{name}"')
    finally:
        await conn.close()


async def _fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


# --- the real CLI in subprocesses (acceptance tests) -----------------------------------

PY = [sys.executable, "-m", "ganns_async"]
Process = subprocess.Popen[bytes] | ForkedProcess  # what _spawn returns


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """Run the real CLI in a subprocess (forked from the fork server when it can be)."""
    full_env = {**os.environ, **(env or {})}
    if set(kw) <= {"cwd"}:
        return forkserver.run(["-m", "ganns_async", *args], env=full_env, cwd=kw.get("cwd", REPO), timeout=timeout)
    return subprocess.run(
        [sys.executable, "-m", "ganns_async", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=kw.pop("cwd", REPO), **kw,
    )


def cli_in_process(*args: str, env: dict[str, str] | None = None, **_: object) -> subprocess.CompletedProcess[str]:
    """The CLI in this process (typer's CliRunner), answered like :func:`cli`: for the quick
    cases that need no subprocess. An exception that escaped the CLI counts as a traceback
    on stderr with exit 1, as it would in a real process. Use with the ``keep_logging``
    fixture (the root callback points logging at the captured stderr)."""
    import traceback

    from typer.testing import CliRunner

    from ganns_async.cli import app

    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=True)
    stderr, code = result.stderr, result.exit_code
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
        code = 1
    return subprocess.CompletedProcess(list(args), code, result.stdout, stderr)


def _spawn(*args: str, log: Path) -> Process:
    """Start the real CLI with ``args``, its output in ``log`` (forked from the fork server,
    see tests/forkserver.py)."""
    with open(log, "wb") as fh:
        # PYTHONFAULTHANDLER: a process that does not stop when asked dumps its threads'
        # stacks into its log on SIGABRT (see _stop).
        return forkserver.popen(["-m", "ganns_async", *args], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "GANNS_NO_TUI": "1", "PYTHONFAULTHANDLER": "1"})


def _spawn_script(script: Path, *args: str, log: Path) -> Process:
    """Start one of the tests' own scripts (``tests/acceptance/hostile_worker.py``) like :func:`_spawn`."""
    with open(log, "wb") as fh:
        return forkserver.popen([str(script), *args], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def _stop(proc: Process, sig: int = signal.SIGINT, timeout: float = 30) -> int:
    """Ask ``proc`` to stop with ``sig``; after ``timeout`` seconds, SIGABRT (a process from
    :func:`_spawn` writes its threads' stacks to its log) and then SIGKILL. Returns its exit
    code: negative when a signal ended it."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


async def _wait_for_worker_state(url: str, name: str, state: str, timeout: float = 120) -> int:
    """Block until worker ``name`` reports ``state``; woken by the workers trigger, not a poll loop."""
    conn = await asyncpg.connect(url)
    changed = asyncio.Event()
    await conn.add_listener("ganns_workers", lambda *_: changed.set())
    try:
        async def check() -> int | None:
            return await conn.fetchval("SELECT id FROM workers WHERE name = $1 AND state = $2", name, state)

        deadline = asyncio.get_running_loop().time() + timeout
        while (found := await check()) is None:
            changed.clear()
            if (found := await check()) is not None:
                break
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, f"worker {name} never reached state {state}"
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return found
    finally:
        await conn.close()


# --- the synchronous reference run (train-local) --------------------------------------

SEED, UNIT, UNITS_PER_STEP, STEPS = 7, 16, 2, 3
# A narrow DCGAN (``--feature-maps 16``, a ninth of the model card's compute and bytes) for
# the tests whose claim is about the protocol or the arithmetic of a run, not the model:
# equal to train-local, refused or recomputed units, recovery. Tests about the model users
# get (its checkpoint, its card, how well it learns, the demo) keep the default, 64.
WIDTH = 16


_LOCAL_RUNS: dict[tuple[str, tuple[tuple[str, float | str], ...]], dict[str, torch.Tensor]] = {}


def _train_local(synth_zip: Path, tmp_path: Path, **kw: float | str) -> dict[str, torch.Tensor]:
    """The weights (``G.``, ``D.``, ``EMA.``) train-local ends with, run on ``synth_zip`` with
    the settings above and ``kw``. train-local is deterministic and many tests compare
    with the same run, so each run is computed once per test process (a copy is returned)."""
    key = (str(synth_zip), tuple(sorted(kw.items())))
    if key not in _LOCAL_RUNS:
        _LOCAL_RUNS[key] = _compute_train_local(synth_zip, tmp_path, **kw)
    return {k: v.clone() for k, v in _LOCAL_RUNS[key].items()}


def _compute_train_local(synth_zip: Path, tmp_path: Path, **kw: float | str) -> dict[str, torch.Tensor]:
    from ganns_async.local import LocalOptions, train_local
    from ganns_async.training import TrainConfig

    threads = torch.get_num_threads()
    try:
        cfg = TrainConfig(seed=SEED, unit_size=UNIT, units_per_step=UNITS_PER_STEP, max_staleness=0,
                          **{"grad_dtype": "fp32", **kw})  # type: ignore[arg-type]
        result = train_local(LocalOptions(data=str(synth_zip), max_steps=STEPS, out=tmp_path / "local",
                                          config=cfg, checkpoint_every=STEPS, threads=1))
    finally:
        torch.set_num_threads(threads)
    assert result.trainer.g_ema is not None
    return {**{f"G.{k}": v.clone() for k, v in result.trainer.g.state_dict().items()},
            **{f"D.{k}": v.clone() for k, v in result.trainer.d.state_dict().items()},
            **{f"EMA.{k}": v.clone() for k, v in result.trainer.g_ema.state_dict().items()}}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# --- the system's PostgreSQL 15 -------------------------------------------------------

PG15_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def pg15_cluster(password: str | None = None) -> Iterator[str]:
    """A throwaway PostgreSQL 15 on a Unix socket in a temp dir; yields the superuser URL.

    With ``password``, every connection must authenticate with scram-sha-256.
    Skips the test when /usr/lib/postgresql/15 is not installed.
    """
    if not (PG15_BIN / "initdb").exists():
        pytest.skip(f"system PostgreSQL 15 not installed ({PG15_BIN / 'initdb'} missing)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="ganns-pg15-"))
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root; the embedded server's setup made this user.
        if subprocess.run(["id", "pgserver"], capture_output=True).returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("running as root and there is no 'pgserver' user to run PostgreSQL 15 as")
        as_user = ["runuser", "-u", "pgserver", "--"]
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    init = [str(PG15_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--no-locale"]
    if password is not None:
        (root / "pw").write_text(password + "\n")
        init += ["--auth=scram-sha-256", f"--pwfile={root / 'pw'}"]
    else:
        init += ["--auth=trust"]
    if as_user:
        shutil.chown(root, "pgserver", "pgserver")
        shutil.chown(sock, "pgserver", "pgserver")
        if password is not None:
            shutil.chown(root / "pw", "pgserver", "pgserver")
    port = _free_port()
    pg_ctl = [*as_user, str(PG15_BIN / "pg_ctl"), "-D", str(data)]
    started = False
    try:
        r = subprocess.run([*as_user, *init], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"initdb failed:\n{r.stdout}\n{r.stderr}"
        r = subprocess.run(
            [*pg_ctl, "-l", str(root / "log"), "-w", "-t", "60",
             "-o", f"-c listen_addresses='' -k {sock} -p {port} -c fsync=off", "start"],
            capture_output=True, text=True, timeout=90,
        )
        started = True
        log = (root / "log").read_text(errors="replace") if (root / "log").exists() else ""
        assert r.returncode == 0, f"pg_ctl start failed:\n{r.stdout}\n{r.stderr}\n{log}"
        auth = f"postgres:{password}" if password is not None else "postgres"
        yield f"postgresql://{auth}@/postgres?host={sock}&port={port}"
    finally:
        if started:
            subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


# --- compose.yaml: what the official postgres image does with it ----------------------

COMPOSE_FILE = REPO / "compose.yaml"
INITDB_DIR = "/docker-entrypoint-initdb.d"
# What docker-entrypoint.sh's docker_process_init_files does something with (a *.sh is run or
# sourced, the others go through psql); it echoes "ignoring" for any other name.
INITDB_RUNS = (".sh", ".sql", ".sql.gz", ".sql.xz", ".sql.zst")
_DEFAULT_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-)([^}]*)\}")


def load_compose(path: Path = COMPOSE_FILE) -> dict:
    import yaml

    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def compose_defaults(value: str) -> str:
    """``value`` as compose reads it with none of the overrides set: ``${VAR:-default}`` and
    ``${VAR-default}`` become their defaults (a ``${VAR}`` without one stays as it is)."""
    return _DEFAULT_RE.sub(lambda m: m.group(3), value)


def compose_environment(service: dict) -> dict[str, str]:
    """A service's ``environment``, given as a mapping or as a list of KEY=VALUE."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def compose_mounts(service: dict) -> list[dict]:
    """A service's ``volumes`` in compose's long syntax (type, source, target, read_only)."""
    out = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            out.append(dict(entry))
            continue
        parts = str(entry).split(":")
        source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
        kind = "bind" if source and source[0] in "./~" else "volume"
        out.append({"type": kind, "source": source, "target": target,
                    "read_only": len(parts) > 2 and "ro" in parts[2].split(",")})
    return out


def compose_postgres_service(compose: dict) -> tuple[str, dict]:
    """The one service that runs the official postgres image: (its name, its definition)."""
    found = [(name, svc) for name, svc in (compose.get("services") or {}).items()
             if image_repository(str(svc.get("image", ""))) == "postgres"]
    assert len(found) == 1, f"expected one service on the official postgres image, found {[n for n, _ in found]}"
    return found[0]


def image_repository(image: str) -> str:
    """``postgres`` for the official image however it is spelled (``docker.io/library/postgres``)."""
    name = compose_defaults(image).split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    for prefix in ("docker.io/library/", "docker.io/", "library/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def image_major(image: str) -> int:
    """The PostgreSQL major version of an image reference with its defaults: ``17`` for
    ``postgres:${GANNS_PG_VERSION:-17}``, ``postgres:17.4-bookworm`` or ``postgres:17-alpine``."""
    tag = compose_defaults(image).split("@", 1)[0].rsplit("/", 1)[-1].partition(":")[2]
    digits = re.match(r"(\d+)", tag)
    assert digits, f"image {image!r} pins no major version (tag {tag!r})"
    return int(digits.group(1))


def compose_initdb_files(service: dict, base: Path = REPO) -> list[tuple[str, Path]]:
    """The files the image's entrypoint runs on first start, in its order: (name in the
    container's /docker-entrypoint-initdb.d, the file on this machine).

    The entrypoint runs ``docker_process_init_files /docker-entrypoint-initdb.d/*``: the
    shell's glob (one level, no dot files, sorted), each name by its ending (INITDB_RUNS).
    A folder bound at the directory shows its entries; a file bound at a name inside it
    shows as that name, over what the folder has there.
    """
    seen: dict[str, Path] = {}
    mounts = compose_mounts(service)
    for mount in sorted(mounts, key=lambda m: len(str(m.get("target", "")).rstrip("/"))):
        target = str(mount.get("target", "")).rstrip("/")
        if target != INITDB_DIR and not target.startswith(INITDB_DIR + "/"):
            continue
        assert mount.get("type") == "bind", f"{target}: only bind mounts can be read from here, not {mount}"
        source = (base / compose_defaults(str(mount["source"]))).resolve()
        assert source.exists(), f"{target}: bound from {source}, which does not exist"
        if target == INITDB_DIR:
            assert source.is_dir(), f"{INITDB_DIR} is bound to {source}, which is not a folder"
            seen = {p.name: p for p in source.iterdir()}
        else:
            rest = target[len(INITDB_DIR) + 1:]
            if "/" not in rest:  # deeper ones sit in a subfolder, which the glob does not enter
                seen[rest] = source
    runs = [(name, path) for name, path in seen.items()
            if not name.startswith(".") and name.endswith(INITDB_RUNS)]
    return [(f"{INITDB_DIR}/{name}", path) for name, path in sorted(runs)]


# --- terminal safety ------------------------------------------------------------------

HOSTILE = [
    "\x1b]52;c;cm0gLXJmIH4=\x07",  # OSC 52: write the clipboard
    "\x1b[2J\x1b[H",  # clear the screen
    "[/x]",  # a Rich closing tag that matches nothing: MarkupError
    "[bold red]fake[/]",
    "line\nstep 99 applied",  # a forged log line
    "\u202egnp.exe",  # right-to-left override
    "\x9b31m",  # C1 CSI
]


def _render(renderable: object) -> str:
    from rich.console import Console

    console = Console(record=True, width=120, color_system="truecolor", force_terminal=True)
    console.print(renderable)
    return console.export_text(clear=False)


# --- one-line errors (tests/unit/test_cli_errors_no_server.py, tests/acceptance/test_cli_errors.py) ---

UNREACHABLE = "postgresql://u:secretpw@127.0.0.1:1/db"  # port 1: connection refused


def assert_one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    """Non-zero exit, exactly one stderr line `error: ...` holding every word, no traceback."""
    assert r.returncode != 0, f"exit 0:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{r.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    for w in words:
        assert w.lower() in line.lower(), f"{w!r} not in {line!r}"
    return line


def no_ganns_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads GANNS_* variables: none from the caller's shell may leak into a case."""
    for key in list(os.environ):
        if key.startswith("GANNS_"):
            monkeypatch.delenv(key)


def no_database_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No database named by the environment either (DATABASE_URL, libpq's PG* variables)."""
    for key in ("DATABASE_URL", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE"):
        monkeypatch.delenv(key, raising=False)


async def require_migrated_at(url: str) -> None:
    """ganns_async.migrate.require_migrated on a connection of its own."""
    from ganns_async.db import Database
    from ganns_async.migrate import require_migrated

    db = await Database.open(url)
    try:
        await require_migrated(db)
    finally:
        await db.close()


# --- faults injected through the server ---------------------------------------------

def disk_full_sql(*tables: str) -> str:
    """SQL that makes every write to ``tables`` fail as PostgreSQL fails a write that cannot
    extend a file on a full disk (SQLSTATE 53100, its message and hint), until
    :data:`SPACE_AGAIN`. Triggers, since a really full disk would stop the test's own
    queries too."""
    return """
CREATE FUNCTION test_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'could not extend file "base/16384/16415": No space left on device'
        USING ERRCODE = 'disk_full', HINT = 'Check free disk space.';
END $$;
""" + "".join(f"CREATE TRIGGER test_disk_full BEFORE INSERT OR UPDATE OR DELETE ON {t} "
              "FOR EACH STATEMENT EXECUTE FUNCTION test_disk_full();\n" for t in tables)


SPACE_AGAIN = "DROP FUNCTION test_disk_full() CASCADE"
