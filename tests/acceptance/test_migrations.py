"""Migrations: the CLI and plain psql build the same schema, and the CLI guards it.

Everything runs against a real PostgreSQL: the session's server (embedded PostgreSQL 18
unless DATABASE_URL is set) and, where the system has it, a throwaway PostgreSQL 15.
(The files themselves: tests/unit/test_migration_files.py; require_migrated in-process:
tests/integration/test_migrations_db.py.)
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from helpers import (
    PG15_BIN,
    REPO,
    assert_one_line_error,
    cli,
    fresh_database,
    pg15_cluster,
    require_migrated_at,
)

from ganns_async.embedded import psql_binary

SQL_FILES = sorted(p for p in (REPO / "sql").iterdir() if p.suffix == ".sql" and p.name[:3].isdigit())


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# --- helpers --------------------------------------------------------------------------


@pytest.fixture
def db_url2(pg_server: str) -> Iterator[str]:
    with fresh_database(pg_server) as url:
        yield url


def psql_migrate(url: str, psql: str | None = None) -> None:
    """What ops does: every sql/NNN_*.sql in order through the real psql."""
    psql = psql or psql_binary()
    assert psql, "no psql binary found (neither the embedded server's nor the system's)"
    assert SQL_FILES, "no migrations in sql/"
    for path in SQL_FILES:
        r = subprocess.run(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(path), url],
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 0, f"psql -f {path.name} failed:\n{r.stdout}\n{r.stderr}"


def psql_command(url: str, sql: str, psql: str | None = None) -> None:
    psql = psql or psql_binary()
    assert psql
    r = subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql, url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"psql -c {sql!r} failed:\n{r.stdout}\n{r.stderr}"


SCHEMA_QUERIES = {
    "tables": """
        SELECT c.relname, c.relkind::text, c.relpersistence::text
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'S', 'v', 'm')
         ORDER BY c.relname""",
    "columns": """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod) AS type,
               a.attnotnull, pg_get_expr(d.adbin, d.adrelid) AS default, a.attstorage::text
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY c.relname, a.attnum""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
         WHERE schemaname = 'public' ORDER BY tablename, indexname""",
    "constraints": """
        SELECT c.conrelid::regclass::text AS tbl, c.conname, c.contype::text, pg_get_constraintdef(c.oid) AS def
          FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
         WHERE n.nspname = 'public' ORDER BY 1, 2""",
    "triggers": """
        SELECT t.tgrelid::regclass::text AS tbl, t.tgname, pg_get_triggerdef(t.oid) AS def
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND NOT t.tgisinternal ORDER BY 1, 2""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args, pg_get_functiondef(p.oid) AS def
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'public' ORDER BY 1, 2""",
}


async def describe_schema(url: str) -> dict[str, list[tuple]]:
    conn = await asyncpg.connect(url)
    try:
        return {key: [tuple(r) for r in await conn.fetch(sql)] for key, sql in SCHEMA_QUERIES.items()}
    finally:
        await conn.close()


def schema(url: str) -> dict[str, list[tuple]]:
    return _run(describe_schema(url))


def assert_schema_content(s: dict[str, list[tuple]]) -> None:
    """The description is not vacuous: it holds what 001_schema.sql creates."""
    persistence = {name: p for name, kind, p in s["tables"] if kind == "r"}
    for table in ("ganns_migrations", "runs", "weights", "workers", "work_units", "gradients",
                  "rejections", "events", "metrics"):
        assert table in persistence, f"table {table} missing: {sorted(persistence)}"
    assert persistence["gradients"] == "u", "gradients must be UNLOGGED"
    assert persistence["work_units"] == "p" and persistence["weights"] == "p"

    storage = {(t, col): st for t, _n, col, _ty, _nn, _d, st in s["columns"]}
    assert storage[("gradients", "payload")] == "e"
    assert storage[("weights", "payload")] == "e"
    assert storage[("weights", "optimizer")] == "e"
    assert storage[("events", "message")] == "x"  # text keeps its default (extended)
    cols = {(t, col): (ty, nn, d) for t, _n, col, ty, nn, d, _st in s["columns"]}
    assert cols[("work_units", "indices")] == ("integer[]", True, None)
    assert cols[("runs", "status")] == ("text", True, "'running'::text")
    assert cols[("runs", "id")][2] == "nextval('runs_id_seq'::regclass)"

    indexes = {name: d for _t, name, d in s["indexes"]}
    assert "WHERE (state = 'pending'::text)" in indexes["work_units_pending_idx"]
    # One place in the schedule per unit; copies checking a result (replica_of) share it.
    assert "WHERE (replica_of IS NULL)" in indexes["work_units_run_seq_idx"]

    constraints = {(t, name): d for t, name, _k, d in s["constraints"]}
    assert any(t == "gradients" and "REFERENCES work_units(id) ON DELETE CASCADE" in d
               for (t, _), d in constraints.items())
    assert any(t == "runs" and "CHECK" in d and "'paused'" in d for (t, _), d in constraints.items())

    triggers = {(t, name): d for t, name, d in s["triggers"]}
    assert set(triggers) >= {("work_units", "work_units_inserted"), ("work_units", "work_units_requeued"),
                             ("gradients", "gradients_inserted"), ("runs", "runs_changed"),
                             ("workers", "workers_changed")}
    ins = triggers[("work_units", "work_units_inserted")]
    assert "AFTER INSERT ON public.work_units" in ins and "REFERENCING NEW TABLE AS new_units" in ins
    assert "FOR EACH STATEMENT" in ins and "ganns_notify_units_inserted()" in ins

    functions = {name: d for name, _a, d in s["functions"]}
    assert set(functions) >= {"ganns_notify_units_inserted", "ganns_notify_units_requeued",
                              "ganns_notify_gradient", "ganns_notify_run", "ganns_notify_worker"}
    assert "pg_notify('ganns_units'" in functions["ganns_notify_units_inserted"]


async def _migrations_rows(url: str) -> list[tuple[str, str | None]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch("SELECT name, checksum FROM ganns_migrations ORDER BY name")]
    finally:
        await conn.close()


def file_checksum(name: str) -> str:
    return hashlib.sha256((REPO / "sql" / f"{name}.sql").read_text(encoding="utf-8").encode("utf-8")).hexdigest()




# --- CLI and psql agree ---------------------------------------------------------------


def test_cli_and_psql_give_the_same_schema(db_url: str, db_url2: str) -> None:
    r = cli("db", "migrate", "--db", db_url)
    assert r.returncode == 0, r.stderr
    assert "applied 001_schema" in r.stdout
    psql_migrate(db_url2)

    by_cli, by_psql = schema(db_url), schema(db_url2)
    assert_schema_content(by_cli)
    for key in SCHEMA_QUERIES:
        assert by_cli[key] == by_psql[key], f"{key} differ between CLI and psql migration"
    assert by_cli == by_psql

    # Both record the migration; only the CLI records the checksum.
    names = [p.stem for p in SQL_FILES]
    assert _run(_migrations_rows(db_url)) == [(n, file_checksum(n)) for n in names]
    assert _run(_migrations_rows(db_url2)) == [(n, None) for n in names]


def test_migrate_twice_is_a_noop(db_url: str) -> None:
    r = cli("db", "migrate", "--db", db_url)
    assert r.returncode == 0, r.stderr
    before = schema(db_url)
    rows_before = _run(_migrations_rows(db_url))

    r = cli("db", "migrate", "--db", db_url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "database is up to date"
    assert "Traceback" not in r.stderr
    assert schema(db_url) == before
    assert _run(_migrations_rows(db_url)) == rows_before


def test_psql_migration_then_cli_records_checksum(db_url: str) -> None:
    psql_migrate(db_url)
    before = schema(db_url)
    assert_schema_content(before)

    r = cli("db", "status", "--db", db_url)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("001_schema"))
    assert "applied (by psql)" in line

    # Coordinator and workers accept a psql-migrated database as it is.
    _run(require_migrated_at(db_url))

    r = cli("db", "migrate", "--db", db_url)
    assert r.returncode == 0, r.stderr
    assert "database is up to date" in r.stdout
    assert _run(_migrations_rows(db_url))[0] == ("001_schema", file_checksum("001_schema"))
    assert schema(db_url) == before

    r = cli("db", "status", "--db", db_url)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("001_schema"))
    assert "applied" in line and "by psql" not in line and "CHANGED" not in line
    _run(require_migrated_at(db_url))


def test_checksum_mismatch_is_refused(migrated_url: str) -> None:
    psql_command(migrated_url, "UPDATE ganns_migrations SET checksum = 'deadbeef' WHERE name = '001_schema'")
    before = schema(migrated_url)

    r = cli("db", "migrate", "--db", migrated_url)
    assert_one_line_error(r, "001_schema", "checksum")
    assert "deadbeef" in r.stderr
    assert schema(migrated_url) == before
    assert _run(_migrations_rows(migrated_url))[0] == ("001_schema", "deadbeef")

    r = cli("db", "status", "--db", migrated_url)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("001_schema"))
    assert "CHANGED since applied" in line


def test_status_on_empty_database_lists_pending(db_url: str) -> None:
    r = cli("db", "status", "--db", db_url)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("001_schema"))
    assert "pending" in line
    # status must not have created anything
    assert schema(db_url)["tables"] == []


def test_worker_refuses_unmigrated_database(db_url: str, synth_zip: Path) -> None:
    r = cli("worker", "--db", db_url, "--data", str(synth_zip), "--device", "cpu", "--no-tui", timeout=120)
    assert_one_line_error(r, "not migrated", "ganns-async db migrate")
    assert schema(db_url)["tables"] == []


def test_coordinator_refuses_unmigrated_database(db_url: str, synth_zip: Path, tmp_path: Path) -> None:
    r = cli("coordinator", "--db", db_url, "--data", str(synth_zip), "--out", str(tmp_path / "out"),
            "--no-tui", timeout=120)
    assert_one_line_error(r, "not migrated", "ganns-async db migrate")
    assert schema(db_url)["tables"] == []


# --- the system's PostgreSQL 15 -------------------------------------------------------


async def _notify_from_psql_insert(url: str, psql: str) -> list[tuple[str, str]]:
    got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    conn = await asyncpg.connect(url)
    try:
        await conn.add_listener("ganns_units", lambda _c, _pid, ch, payload: got.put_nowait((ch, payload)))
        await asyncio.to_thread(
            psql_command, url, "INSERT INTO runs (config, dataset_fingerprint, dataset_size) VALUES ('{}', 'x', 1)", psql)
        await asyncio.to_thread(
            psql_command, url,
            "INSERT INTO work_units (run_id, seq, step, version, epoch, indices, noise_seed) "
            "VALUES (1, 0, 0, 0, 0, '{1,2}', 7)", psql)
        first = await asyncio.wait_for(got.get(), 10)
        await asyncio.sleep(0.2)  # one statement, one notification: nothing else follows
        rest = []
        while not got.empty():
            rest.append(got.get_nowait())
        return [first, *rest]
    finally:
        await conn.close()


def test_postgresql_15() -> None:
    with pg15_cluster() as server:
        version = _run(_server_version(server))
        assert version.startswith("15"), version
        psql15 = str(PG15_BIN / "psql")
        with fresh_database(server) as by_cli, fresh_database(server) as by_psql:
            r = cli("db", "migrate", "--db", by_cli)
            assert r.returncode == 0, r.stderr
            assert "applied 001_schema" in r.stdout
            psql_migrate(by_psql, psql15)

            s_cli, s_psql = schema(by_cli), schema(by_psql)
            assert_schema_content(s_cli)
            assert s_cli == s_psql

            _run(require_migrated_at(by_cli))
            _run(require_migrated_at(by_psql))
            r = cli("db", "status", "--db", by_psql)
            assert r.returncode == 0 and "applied (by psql)" in r.stdout, r.stdout + r.stderr

            assert _run(_notify_from_psql_insert(by_psql, psql15)) == [("ganns_units", "1")]
            assert _run(_notify_from_psql_insert(by_cli, psql15)) == [("ganns_units", "1")]


async def _server_version(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
