"""sql/005_resources.sql the way ops applies it: plain psql on top of a class's database of the
previous release (001-004), then `ganns-async db migrate`, which takes it as applied. (The
same on top of 004 in-process, and what the migration does: tests/integration/test_resources.py.)"""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg

from ganns_async.embedded import psql_binary
from helpers import REPO, cli

SQL = REPO / "sql"
SCHEMA = """
    SELECT 'column', attname || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute
     WHERE attrelid = 'workers'::regclass AND attnum > 0 AND NOT attisdropped
    UNION ALL
    SELECT 'constraint', conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
     WHERE conrelid = 'workers'::regclass
    UNION ALL
    SELECT 'function', p.oid::regprocedure::text || ' ' || md5(pg_get_functiondef(p.oid)) FROM pg_proc AS p
     WHERE p.pronamespace IN ('ganns_api'::regnamespace, 'ganns_view'::regnamespace)
    UNION ALL
    SELECT 'migration', name || ' ' || coalesce(checksum, 'psql') FROM ganns_migrations
    ORDER BY 1, 2"""


def psql(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    binary = psql_binary()
    assert binary, "no psql binary found (neither the embedded server's nor the system's)"
    return subprocess.run([binary, "-X", "-q", "-v", "ON_ERROR_STOP=1", *args, url],
                          capture_output=True, text=True, timeout=60)


async def _fetch(url: str, sql: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


def test_psql_applies_005_on_top_of_004_once(db_url: str) -> None:
    for name in ("001_schema", "002_bounded", "003_roles", "004_states"):
        r = psql(db_url, "-f", str(SQL / f"{name}.sql"))
        assert r.returncode == 0, f"{name}: {r.stderr}"
    # A worker of the previous release registered before the upgrade.
    r = psql(db_url, "-c", "SELECT * FROM ganns_api.register('lab-pc', 'h', 'cpu', NULL, NULL)")
    assert r.returncode == 0, r.stderr

    r = psql(db_url, "-f", str(SQL / "005_resources.sql"))
    assert r.returncode == 0, r.stderr
    applied = asyncio.run(_fetch(db_url, SCHEMA))
    assert ("migration", "005_resources psql") in applied
    assert asyncio.run(_fetch(db_url, "SELECT name, cpu_cores, gpu_count FROM workers")) == [("lab-pc", None, None)]
    # The previous release's call and the new one, both through psql.
    r = psql(db_url, "-c", "SELECT * FROM ganns_api.register('old', 'h', 'cpu', NULL, NULL)",
             "-c", "SELECT * FROM ganns_api.register('new', 'h', 'cuda', NULL, NULL, 8, 1, 12884901888, 'Tesla T4')",
             "-c", "SELECT workers, reporting, cpu_cores, gpus, gpu_memory_bytes FROM ganns_view.class_resources()")
    assert r.returncode == 0, r.stderr
    assert asyncio.run(_fetch(db_url, "SELECT workers, reporting, cpu_cores, gpus, gpu_memory_bytes "
                                      "FROM ganns_view.class_resources()")) == [(3, 1, 8, 1, 12884901888)]

    # Applied twice, like every migration: the second try stops on its first statement, and
    # the transaction leaves everything as it was.
    before = asyncio.run(_fetch(db_url, SCHEMA))
    again = psql(db_url, "-f", str(SQL / "005_resources.sql"))
    assert again.returncode != 0 and "already exists" in again.stderr, again.stderr
    assert asyncio.run(_fetch(db_url, SCHEMA)) == before

    # The CLI takes psql's work as done and records the checksum.
    r = cli("db", "migrate", "--db", db_url)
    assert r.returncode == 0 and "database is up to date" in r.stdout, r.stdout + r.stderr
    r = cli("db", "status", "--db", db_url)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("005_resources"))
    assert "applied" in line and "by psql" not in line and "CHANGED" not in line, r.stdout
