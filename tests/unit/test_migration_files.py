"""The migrations in sql/ and the psql that applies them are there (the migrations
themselves: tests/integration/test_migrations_db.py, tests/acceptance/test_migrations.py)."""

from __future__ import annotations

from ganns_async.embedded import psql_binary
from helpers import REPO

SQL_FILES = sorted(p for p in (REPO / "sql").iterdir() if p.suffix == ".sql" and p.name[:3].isdigit())


def test_sql_files_present() -> None:
    assert [p.name for p in SQL_FILES][:1] == ["001_schema.sql"]
    assert psql_binary(), "psql not found"
