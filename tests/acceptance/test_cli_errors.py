"""User mistakes reach the user as one `error: ...` line on stderr, never a traceback.

Each case runs the real CLI in a subprocess against a real PostgreSQL (the session's
server, or a throwaway PostgreSQL 15 for password authentication).
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from helpers import cli, pg15_cluster, with_database

UNREACHABLE = "postgresql://u:secretpw@127.0.0.1:1/db"  # port 1: connection refused


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def _no_ganns_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads GANNS_* variables: none from the caller's shell may leak into a case."""
    import os

    for key in list(os.environ):
        if key.startswith("GANNS_"):
            monkeypatch.delenv(key)


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


def cli_parallel(*calls: tuple[tuple[str, ...], dict]) -> list[subprocess.CompletedProcess[str]]:
    """Run several CLI subprocesses at once (each pays the torch import): ``((args), {kwargs})``."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(cli, *args, **kw) for args, kw in calls]
        return [f.result() for f in futures]


def with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    hostport = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{user}:{password}@{hostport}", parts.path, parts.query, parts.fragment))


# --- the database ---------------------------------------------------------------------


def test_unreachable_database_worker(synth_zip: Path) -> None:
    r = cli("worker", "--db", UNREACHABLE, "--data", str(synth_zip), "--device", "cpu", "--no-tui", timeout=120)
    line = assert_one_line_error(r, "cannot reach PostgreSQL", "127.0.0.1:1", "connection refused")
    assert "secretpw" not in r.stderr + r.stdout, "the password must never be printed"
    assert "GANNS_DB_URL" in line


@pytest.mark.parametrize("args", [("db", "migrate"), ("db", "status")])
def test_unreachable_database_db_commands(args: tuple[str, ...]) -> None:
    r = cli(*args, "--db", UNREACHABLE)
    assert_one_line_error(r, "cannot reach PostgreSQL", "connection refused")
    assert "secretpw" not in r.stderr + r.stdout


def test_unreachable_database_coordinator(synth_zip: Path, tmp_path: Path) -> None:
    r = cli("coordinator", "--db", UNREACHABLE, "--data", str(synth_zip), "--out", str(tmp_path / "out"),
            "--no-tui", timeout=120)
    assert_one_line_error(r, "cannot reach PostgreSQL", "connection refused")


def test_db_url_from_environment(synth_zip: Path) -> None:
    """GANNS_DB_URL instead of --db: the same one-line error, so the variable was used."""
    by_option, by_env = cli_parallel(
        (("worker", "--db", UNREACHABLE, "--data", str(synth_zip), "--device", "cpu", "--no-tui"), {"timeout": 120}),
        (("worker", "--data", str(synth_zip), "--device", "cpu", "--no-tui"),
         {"env": {"GANNS_DB_URL": UNREACHABLE}, "timeout": 120}),
    )
    line = assert_one_line_error(by_env, "cannot reach PostgreSQL", "127.0.0.1:1", "connection refused")
    assert by_env.returncode == by_option.returncode
    assert line == by_option.stderr.strip()

    r = cli("db", "status", env={"GANNS_DB_URL": UNREACHABLE})
    assert_one_line_error(r, "cannot reach PostgreSQL", "connection refused")


def test_debug_shows_the_traceback(synth_zip: Path) -> None:
    r = cli("--debug", "worker", "--db", UNREACHABLE, "--data", str(synth_zip), "--device", "cpu", "--no-tui",
            timeout=120)
    assert r.returncode != 0
    assert "Traceback" in r.stderr
    assert "ConnectionRefusedError" in r.stderr  # the cause is shown too
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot reach PostgreSQL")

    r = cli("db", "migrate", "--db", UNREACHABLE, env={"GANNS_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize("url", ["mysql://x", "not a url", "mysql://u:pw@host:3306/db"])
def test_bad_database_url(url: str) -> None:
    for args in (("db", "migrate"), ("db", "status")):
        r = cli(*args, "--db", url)
        line = assert_one_line_error(r, "bad database URL", "expected postgresql://")
        assert ":pw@" not in line


def test_bad_database_url_worker_and_coordinator(synth_zip: Path, tmp_path: Path) -> None:
    worker, coordinator = cli_parallel(
        (("worker", "--db", "mysql://x", "--data", str(synth_zip), "--device", "cpu", "--no-tui"), {"timeout": 120}),
        (("coordinator", "--db", "not a url", "--data", str(synth_zip), "--out", str(tmp_path / "out"), "--no-tui"),
         {"timeout": 120}),
    )
    assert_one_line_error(worker, "bad database URL", "mysql://x")
    assert_one_line_error(coordinator, "bad database URL", "expected postgresql://")


def test_empty_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    no_database_env(monkeypatch)
    r = cli("db", "migrate", "--db", "")
    assert_one_line_error(r, "no database given", "GANNS_DB_URL")


@pytest.mark.parametrize("url", ["postgresql://u:p@127.0.0.1:99999/db", "postgresql://u:p@127.0.0.1:abc/db"])
def test_bad_port_in_url(url: str) -> None:
    r = cli("db", "migrate", "--db", url)
    assert_one_line_error(r, "database URL")


def test_database_does_not_exist(pg_server: str, synth_zip: Path) -> None:
    url = with_database(pg_server, f"ganns_missing_{uuid.uuid4().hex[:8]}")
    r = cli("db", "migrate", "--db", url)
    assert_one_line_error(r, "database does not exist", "ganns_missing_", "createdb")
    r = cli("worker", "--db", url, "--data", str(synth_zip), "--device", "cpu", "--no-tui", timeout=120)
    assert_one_line_error(r, "database does not exist")


async def _password_is_checked(server_url: str, role: str) -> bool:
    """Create ``role`` with password 'right'; True when logging in with a wrong one fails."""
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'right'")
    finally:
        await admin.close()
    try:
        conn = await asyncpg.connect(with_user(server_url, role, "wrong"))
    except asyncpg.exceptions.InvalidPasswordError:
        return True
    await conn.close()
    return False


async def _drop_role(server_url: str, role: str) -> None:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        await admin.close()


@pytest.fixture
def password_role(pg_server: str) -> Iterator[str]:
    role = f"ganns_pw_{uuid.uuid4().hex[:8]}"
    try:
        checked = _run(_password_is_checked(pg_server, role))
        if not checked:
            pytest.skip("the test server does not check passwords (trust auth, as the embedded one); "
                        "set DATABASE_URL to a server with password auth, or see test_wrong_password_pg15")
        yield role
    finally:
        _run(_drop_role(pg_server, role))


def test_wrong_password(pg_server: str, password_role: str) -> None:
    r = cli("db", "status", "--db", with_user(pg_server, password_role, "wrong-secret"))
    assert_one_line_error(r, "authentication failed", "wrong user or password", password_role)
    assert "wrong-secret" not in r.stderr


def test_wrong_password_pg15() -> None:
    """A throwaway PostgreSQL 15 with scram-sha-256 everywhere (skipped without it)."""
    with pg15_cluster(password="right") as url:
        ok = cli("db", "status", "--db", url)
        assert ok.returncode == 1 and "pending" in ok.stdout, ok.stdout + ok.stderr  # right password gets in
        bad = with_user(url, "postgres", "wrong-secret")
        r = cli("db", "migrate", "--db", bad)
        assert_one_line_error(r, "authentication failed", "wrong user or password", "postgres@")
        assert "wrong-secret" not in r.stderr
        r = cli("db", "status", "--db", with_user(url, "nobody", "x"))
        assert_one_line_error(r, "authentication failed")


# --- the dataset ----------------------------------------------------------------------


def test_missing_dataset(migrated_url: str, tmp_path: Path) -> None:
    worker, coordinator = cli_parallel(
        (("worker", "--db", migrated_url, "--data", "/nonexistent.zip", "--device", "cpu", "--no-tui"),
         {"timeout": 120}),
        (("coordinator", "--db", migrated_url, "--data", "/nonexistent.zip", "--out", str(tmp_path / "out"),
          "--no-tui"), {"timeout": 120}),
    )
    assert_one_line_error(worker, "dataset not found", "/nonexistent.zip")
    assert_one_line_error(coordinator, "dataset not found", "/nonexistent.zip")


def test_corrupt_zip_dataset(migrated_url: str, tmp_path: Path, synth_zip: Path) -> None:
    corrupt = tmp_path / "celeba.zip"
    corrupt.write_bytes(b"PK\x03\x04 this is not really a zip file" * 10)
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(synth_zip.read_bytes()[: synth_zip.stat().st_size // 2])
    worker, coordinator = cli_parallel(
        (("worker", "--db", migrated_url, "--data", str(corrupt), "--device", "cpu", "--no-tui"), {"timeout": 120}),
        (("coordinator", "--db", migrated_url, "--data", str(truncated), "--out", str(tmp_path / "out"),
          "--no-tui"), {"timeout": 120}),
    )
    assert_one_line_error(worker, "not a readable zip", str(corrupt))
    assert_one_line_error(coordinator, "not a readable zip", str(truncated))


def test_zip_without_images(migrated_url: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "no faces here")
    r = cli("worker", "--db", migrated_url, "--data", str(empty), "--device", "cpu", "--no-tui", timeout=120)
    assert_one_line_error(r, "no images", str(empty))


# --- options --------------------------------------------------------------------------


def no_database_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing that names a database: no DATABASE_URL, no libpq variables (the CLI reads both)."""
    for key in ("DATABASE_URL", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE"):
        monkeypatch.delenv(key, raising=False)


def test_missing_required_option(synth_zip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_database_env(monkeypatch)
    r = cli("worker", "--data", str(synth_zip))
    # Says every way to name the database.
    assert_one_line_error(r, "no database given", "--db", "GANNS_DB_URL", "DATABASE_URL", "PGHOST")

    r = cli("db", "migrate")
    assert_one_line_error(r, "no database given", "--db")

    r = cli("train-local", "--max-steps", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Missing option '--data'" in r.stderr


def test_device_cuda_without_cuda(migrated_url: str, synth_zip: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    r = cli("worker", "--db", migrated_url, "--data", str(synth_zip), "--device", "cuda", "--no-tui", timeout=120)
    assert_one_line_error(r, "cuda", "--device cpu")


def test_unknown_device(synth_zip: Path) -> None:
    r = cli("worker", "--db", UNREACHABLE, "--data", str(synth_zip), "--device", "tpu", "--no-tui", timeout=120)
    assert_one_line_error(r, "unknown device", "tpu")


def test_resume_with_nothing_to_resume(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    r = cli("coordinator", "--db", migrated_url, "--data", str(synth_zip), "--out", str(tmp_path / "out"),
            "--resume", "--no-tui", timeout=120)
    assert_one_line_error(r, "nothing to resume", "without --resume")


def test_grad_dtype_fp16_refused(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    common = ("coordinator", "--db", migrated_url, "--data", str(synth_zip), "--out", str(tmp_path / "out"), "--no-tui")
    by_option, by_env = cli_parallel(
        ((*common, "--grad-dtype", "fp16"), {"timeout": 120}),
        (common, {"timeout": 120, "env": {"GANNS_GRAD_DTYPE": "fp16"}}),
    )
    assert_one_line_error(by_option, "--grad-dtype", "fp16", "bf16")
    assert_one_line_error(by_env, "--grad-dtype", "fp16")


def test_local_step_settings_are_checked_before_anything_starts(tmp_path: Path) -> None:
    """Refused with one line naming the flag, before the database or the data are touched."""
    common = ("coordinator", "--db", UNREACHABLE, "--data", str(tmp_path / "missing.zip"), "--no-tui")
    width, momentum, outer_lr, local = cli_parallel(
        ((*common, "--units-per-step", "many"), {"timeout": 120}),
        ((*common, "--outer-momentum", "1.5"), {"timeout": 120}),
        (("train-local", "--data", str(tmp_path / "missing.zip"), "--max-steps", "1", "--outer-lr", "-1"),
         {"timeout": 120}),
        ((*common, "--local-steps", "0"), {"timeout": 120}),
    )
    assert_one_line_error(width, "--units-per-step", "auto", "many")
    assert_one_line_error(momentum, "--outer-momentum", "1.5")
    assert_one_line_error(outer_lr, "--outer-lr", "-1")
    assert local.returncode != 0 and "--local-steps" in local.stderr and "Traceback" not in local.stderr
