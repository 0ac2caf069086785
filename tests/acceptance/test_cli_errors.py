"""User mistakes reach the user as one `error: ...` line on stderr, never a traceback:
the cases that need a PostgreSQL server, through the real CLI in a subprocess (the
session's server, or a throwaway PostgreSQL 15 for password authentication). The cases
that need none are in tests/unit/test_cli_errors_no_server.py.
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

from helpers import assert_one_line_error, cli, no_ganns_env, pg15_cluster, with_database



def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def _no_ganns_env(monkeypatch: pytest.MonkeyPatch) -> None:
    no_ganns_env(monkeypatch)




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




def test_device_cuda_without_cuda(migrated_url: str, synth_zip: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    r = cli("worker", "--db", migrated_url, "--data", str(synth_zip), "--device", "cuda", "--no-tui", timeout=120)
    assert_one_line_error(r, "cuda", "--device cpu")


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

