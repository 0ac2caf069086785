"""Coordinator and workers refuse a database that was never migrated (in this process; the
CLI's own refusals and the migrations: tests/acceptance/test_migrations.py)."""

from __future__ import annotations

import asyncio

import pytest

from ganns_async.db import Database
from ganns_async.errors import UserError
from ganns_async.migrate import require_migrated


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _require_migrated(url: str) -> None:
    db = await Database.open(url)
    try:
        await require_migrated(db)
    finally:
        await db.close()


def test_require_migrated_refuses_empty_database(db_url: str) -> None:
    with pytest.raises(UserError, match="not migrated"):
        _run(_require_migrated(db_url))
