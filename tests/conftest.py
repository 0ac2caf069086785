"""Fixtures: a real PostgreSQL (DATABASE_URL, or an embedded server), a fresh database per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
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

from ganns_async.data import write_synthetic

REPO = Path(__file__).resolve().parent.parent

# Coordinators started by the tests measure SWD on 64 images instead of 512: the
# measurement is the same code, just cheaper on a 2-core CI machine.
os.environ.setdefault("GANNS_EVAL_N", "64")
# Folder fingerprints cache their files' CRCs under XDG_CACHE_HOME: keep the tests' own
# caches out of the user's (subprocesses inherit it).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ganns-test-cache-")


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of a server we may create databases on."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from ganns_async.embedded import embedded_postgres

    with embedded_postgres() as url:
        yield url


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _create_db(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
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
def fresh_database(server_url: str) -> Iterator[str]:
    """A fresh, empty database on ``server_url``, dropped afterwards."""
    name = f"ganns_test_{uuid.uuid4().hex[:12]}"
    _run(_create_db(server_url, name))
    try:
        yield with_database(server_url, name)
    finally:
        _run(_drop_db(server_url, name))


@pytest.fixture
def db_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database for one test."""
    with fresh_database(pg_server) as url:
        yield url


@pytest.fixture
def migrated_url(db_url: str) -> str:
    from ganns_async.migrate import migrate

    _run(migrate(db_url))
    return db_url


@pytest.fixture(scope="session")
def synth_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic CelebA-layout zip shared by the tests."""
    path = tmp_path_factory.mktemp("data") / "synthetic.zip"
    write_synthetic(path, 96, seed=3)
    return path


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """Run the real CLI in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ganns_async", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=kw.pop("cwd", REPO), **kw,
    )


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
    urls = [await add_login(admin, name, role, generate_password=False) for name, (_, role) in zip(names, kinds)]
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


@pytest.fixture
def class_logins(migrated_url: str) -> Iterator[ClassLogins]:
    """An instructor, three students and a viewer on a migrated database. Roles are
    server-wide, so their names are unique to the test, and they are dropped after it."""
    made = _run(_make_logins(migrated_url, uuid.uuid4().hex[:8]))
    try:
        yield made
    finally:
        _run(drop_logins(migrated_url, made.names))
