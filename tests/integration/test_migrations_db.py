"""Coordinator and workers refuse a database that was never migrated (in this process; the
CLI's own refusals and the migrations: tests/acceptance/test_migrations.py)."""

from __future__ import annotations

import asyncio

import pytest
from helpers import require_migrated_at

from ganns_async.errors import UserError


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)



def test_require_migrated_refuses_empty_database(db_url: str) -> None:
    with pytest.raises(UserError, match="not migrated"):
        _run(require_migrated_at(db_url))
