"""The run lock against a real PostgreSQL: a session of our own that outlived its client is
ended and the lock taken again; a rival's session is never touched. (RunLock also counts a
session whose reply to the lock query was lost as its own; a server that keeps a cut
client's session cannot be staged from here: a closed socket ends the session at once.)"""

from __future__ import annotations

import asyncio

import asyncpg

from ganns_async.db import RunLock

RUN = 4242


async def _holder(conn: asyncpg.Connection) -> int | None:
    return await conn.fetchval("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = 72184555 "
                               "AND objid = $1 AND objsubid = 2 AND granted", RUN)


def test_our_own_lingering_session_is_ended_and_the_lock_taken_again(migrated_url: str) -> None:
    async def main() -> None:
        watcher = await asyncpg.connect(migrated_url)
        lock = RunLock(migrated_url, RUN)
        try:
            assert await lock.acquire()
            first = await _holder(watcher)
            assert first is not None
            # The link is cut and the client never saw the reply: the server still has the
            # session (it has not noticed), and the client no longer has the connection.
            stale, lock._conn = lock._conn, None
            assert stale is not None
            assert await lock.acquire()
            second = await _holder(watcher)
            assert second is not None and second != first
            ended = await watcher.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", first)
            assert ended == 0
            stale.terminate()
        finally:
            await lock.close()
            await watcher.close()

    asyncio.run(main())


def test_a_rivals_session_is_left_alone(migrated_url: str) -> None:
    async def main() -> None:
        rival = await asyncpg.connect(migrated_url)
        lock = RunLock(migrated_url, RUN)
        try:
            assert await rival.fetchval("SELECT pg_try_advisory_lock(72184555, $1::integer)", RUN)
            assert not await lock.acquire()
            assert not await lock.acquire()  # asking twice does not make the rival ours
            assert await _holder(rival) == rival.get_server_pid()
            assert await rival.fetchval("SELECT 1") == 1  # still alive
        finally:
            await lock.close()
            await rival.close()

    asyncio.run(main())
