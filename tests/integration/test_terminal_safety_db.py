"""Strings typed by students reach the instructor's terminal only as plain, printable text,
also when they come from rows in a real PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg

from ganns_async.cluster_state import plain_line, read_snapshot
from ganns_async.dashboard import render_cluster
from ganns_async.db import Database
from helpers import HOSTILE, _render


def test_hostile_rows_in_the_database_render_as_plain_text(migrated_url: str) -> None:
    async def scenario() -> object:
        conn = await asyncpg.connect(migrated_url)
        try:
            run_id = await conn.fetchval(
                "INSERT INTO runs (config, dataset_fingerprint, dataset_size) "
                "VALUES ('{\"local_steps\": 4, \"units_per_step\": 0}', 'x', 10) RETURNING id")
            # Names are CHECKed since sql/003_roles.sql, but rows written before it are not
            # (NOT VALID): the dashboards must survive those too.
            await conn.execute("ALTER TABLE workers DROP CONSTRAINT workers_name_printable")
            for i, name in enumerate(HOSTILE):
                await conn.execute("INSERT INTO workers (name, hostname, device, run_id) VALUES ($1, 'h', $2, $3)",
                                   name, HOSTILE[-1 - i], run_id)
                await conn.execute("INSERT INTO events (run_id, kind, message) VALUES ($1, 'join', $2)",
                                   run_id, f"{name} joined")
        finally:
            await conn.close()
        db = await Database.open(migrated_url, max_size=1)
        try:
            return await read_snapshot(db, title="watch", run_id=run_id, leaderboard=True)
        finally:
            await db.close()

    snap = asyncio.run(scenario())
    text = _render(render_cluster(snap, 120, 40))  # type: ignore[arg-type]
    names = [w.name for w in snap.workers]  # type: ignore[attr-defined]
    assert len(names) == len(HOSTILE)
    for value in names + [e.message for e in snap.events] + [plain_line(snap)]:  # type: ignore[attr-defined]
        assert value.isprintable(), repr(value)
    assert "\x1b]52" not in text and "\u202e" not in text
    assert "[/x]" in text  # shown as typed, not swallowed or fatal
