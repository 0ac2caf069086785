"""The work-unit protocol against a real PostgreSQL: notifications, claims, leases."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from ganns_async.db import GRADIENTS_CHANNEL, UNITS_CHANNEL, Database, Listener


async def _new_run(db: Database) -> int:
    row = await db.fetchrow("create_run", "{}", "fp", 1000)
    assert row is not None
    return row["id"]


async def _worker(db: Database, name: str) -> int:
    row = await db.fetchrow("api_register", name, "host", "cpu", None, None)
    assert row is not None and row["worker_name"] == name  # the owner is trusted: its label is the name
    return row["worker_id"]


async def _claim(db: Database, run_id: int, worker: int, lease_s: float = 60.0) -> asyncpg.Record | None:
    return await db.fetchrow("api_claim", worker, run_id, lease_s)


def _units(start: int, count: int, version: int = 0) -> str:
    return json.dumps([
        {"seq": s, "step": s // 2, "version": version, "epoch": 0, "indices": [s, s + 1], "noise_seed": s}
        for s in range(start, start + count)
    ])


def test_plain_sql_insert_notifies_once_per_statement(migrated_url: str) -> None:
    async def main() -> None:
        db = await Database.open(migrated_url)
        got: list[tuple[str, str]] = []
        arrived = asyncio.Event()

        def on_notify(channel: str, payload: str) -> None:
            got.append((channel, payload))
            arrived.set()

        listener = Listener(migrated_url, [UNITS_CHANNEL], on_notify)
        await listener.start()
        try:
            run_id = await _new_run(db)
            # Exactly what an operator would type in psql: no ganns-async code involved.
            conn = await asyncpg.connect(migrated_url)
            await conn.execute(
                "INSERT INTO work_units (run_id, seq, step, version, epoch, indices, noise_seed) "
                f"VALUES ({run_id}, 0, 0, 0, 0, '{{1,2}}', 7), ({run_id}, 1, 0, 0, 0, '{{3,4}}', 8), "
                f"({run_id}, 2, 1, 0, 0, '{{5,6}}', 9)"
            )
            await asyncio.wait_for(arrived.wait(), 5)
            # A second notification would have arrived by the time this round trip is done.
            await conn.execute("SELECT pg_sleep(0.2)")
            await listener._conn.execute("SELECT 1")  # type: ignore[union-attr]
            assert got == [(UNITS_CHANNEL, str(run_id))]
            await conn.close()
        finally:
            await listener.close()
            await db.close()

    asyncio.run(main())


def test_gradient_insert_and_requeue_notify(migrated_url: str) -> None:
    async def main() -> None:
        db = await Database.open(migrated_url)
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        listener = Listener(migrated_url, [UNITS_CHANNEL, GRADIENTS_CHANNEL], lambda c, p: queue.put_nowait((c, p)))
        await listener.start()
        try:
            run_id = await _new_run(db)
            w = await _worker(db, "a")
            await db.execute("insert_units", run_id, _units(0, 1))
            assert await asyncio.wait_for(queue.get(), 5) == (UNITS_CHANNEL, str(run_id))
            unit = await _claim(db, run_id, w)
            assert unit is not None
            assert await db.fetchval("api_submit", w, unit["id"], 2, b"blob") == "stored"
            channel, payload = await asyncio.wait_for(queue.get(), 5)
            assert channel == GRADIENTS_CHANNEL and payload.startswith(f"{run_id}:")
            # A rejected gradient sends its unit back to pending, which wakes the workers.
            grad_id = int(payload.split(":")[1])
            assert await db.fetchval("reject_gradient", grad_id, unit["id"], run_id, w, "test", 3) == "pending"
            assert await asyncio.wait_for(queue.get(), 5) == (UNITS_CHANNEL, str(run_id))
            assert await db.fetchval("gradient_payload", grad_id) is None
        finally:
            await listener.close()
            await db.close()

    asyncio.run(main())


def test_twenty_concurrent_claimers_never_double_claim(migrated_url: str) -> None:
    async def main() -> None:
        db = await Database.open(migrated_url, max_size=20)
        try:
            run_id = await _new_run(db)
            workers = [await _worker(db, f"w{i}") for i in range(20)]
            await db.execute("insert_units", run_id, _units(0, 100))
            claimed: dict[int, list[int]] = {w: [] for w in workers}

            async def claimer(w: int) -> None:
                while True:
                    row = await _claim(db, run_id, w)
                    if row is None:
                        return
                    claimed[w].append(row["id"])
                    await asyncio.sleep(0)  # let the others interleave

            await asyncio.gather(*(claimer(w) for w in workers))
            all_ids = [u for ids in claimed.values() for u in ids]
            assert len(all_ids) == 100
            assert len(set(all_ids)) == 100, "a unit was claimed twice"
            assert sum(1 for ids in claimed.values() if ids) > 1, "claims were not concurrent"
            counts = {r["state"]: r["n"] for r in await db.fetch("unit_counts", run_id)}
            assert counts == {"claimed": 100}
        finally:
            await db.close()

    asyncio.run(main())


def test_expired_lease_returns_unit_to_another_worker(migrated_url: str) -> None:
    async def main() -> None:
        db = await Database.open(migrated_url)
        try:
            run_id = await _new_run(db)
            alice, bob = await _worker(db, "alice"), await _worker(db, "bob")
            await db.execute("insert_units", run_id, _units(0, 1))
            unit = await _claim(db, run_id, alice, 0.2)  # the server makes it 10 s at least
            assert unit is not None
            assert await _claim(db, run_id, bob) is None
            assert await db.fetch("requeue_expired_leases", run_id) == []  # not expired yet
            conn = await asyncpg.connect(migrated_url)  # the clock moves on (no 10 s sleep)
            await conn.execute("UPDATE work_units SET lease_until = now() - interval '1 second' WHERE id = $1",
                               unit["id"])
            await conn.close()
            requeued = await db.fetch("requeue_expired_leases", run_id)
            assert [(r["id"], r["worker_name"]) for r in requeued] == [(unit["id"], "alice")]
            again = await _claim(db, run_id, bob)
            assert again is not None and again["id"] == unit["id"]
            # Alice comes back late: her result is refused; Bob's is accepted.
            assert await db.fetchval("api_submit", alice, unit["id"], 2, b"late") == "lost"
            assert await db.fetchval("api_submit", bob, unit["id"], 2, b"blob") == "stored"
        finally:
            await db.close()

    asyncio.run(main())


def test_heartbeat_extends_only_own_lease(migrated_url: str) -> None:
    async def main() -> None:
        db = await Database.open(migrated_url)
        try:
            run_id = await _new_run(db)
            alice, bob = await _worker(db, "alice"), await _worker(db, "bob")
            await db.execute("insert_units", run_id, _units(0, 1))
            unit = await _claim(db, run_id, alice)
            assert await db.fetchval("api_extend_lease", bob, unit["id"], 60.0) is False
            assert await db.fetchval("api_extend_lease", alice, unit["id"], 60.0) is True
            assert await db.fetchval("api_release", alice, unit["id"]) is True
            counts = {r["state"]: r["n"] for r in await db.fetch("unit_counts", run_id)}
            assert counts == {"pending": 1}
        finally:
            await db.close()

    asyncio.run(main())


def test_listener_reconnects_after_connection_is_killed(migrated_url: str) -> None:
    async def main() -> None:
        db = await Database.open(migrated_url)
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        reconnected = asyncio.Event()
        listener = Listener(migrated_url, [UNITS_CHANNEL], lambda c, p: queue.put_nowait((c, p)), reconnected.set,
                            ping_after=0.2)
        await listener.start()
        reconnected.clear()
        try:
            pid = listener._conn.get_server_pid()  # type: ignore[union-attr]
            conn = await asyncpg.connect(migrated_url)
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
            await conn.close()
            await asyncio.wait_for(reconnected.wait(), 20)
            assert listener.reconnects == 1
            run_id = await _new_run(db)
            await db.execute("insert_units", run_id, _units(0, 1))
            assert await asyncio.wait_for(queue.get(), 5) == (UNITS_CHANNEL, str(run_id))
        finally:
            await listener.close()
            await db.close()

    asyncio.run(main())
