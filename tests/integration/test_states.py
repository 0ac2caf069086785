"""The unit state machine and the worker vocabulary: Python's table, the guard trigger of
sql/004_states.sql and the transition queries agree, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import json

import asyncpg
import pytest

from ganns_async.db import Database
from ganns_async.states import (
    REPORTED_WORKER_STATES,
    UNIT_TRANSITIONS,
    UnitState,
    WorkerState,
)


async def _run(db: Database) -> int:
    row = await db.fetchrow("create_run", "{}", "fp", 1000)
    assert row is not None
    return int(row["id"])


def test_guard_trigger_allows_exactly_the_table(migrated_url: str) -> None:
    """All 20 changes of state, tried as a plain UPDATE (what psql would do)."""

    async def main() -> None:
        db = await Database.open(migrated_url)
        conn = await asyncpg.connect(migrated_url)
        try:
            run_id = await _run(db)
            for seq, (before, after) in enumerate(itertools.permutations(UnitState, 2)):
                unit = await conn.fetchval(
                    "INSERT INTO work_units (run_id, seq, step, version, epoch, indices, noise_seed, state) "
                    "VALUES ($1, $2, 0, 0, 0, '{1}', 1, $3) RETURNING id", run_id, seq, str(before))
                try:
                    await conn.execute("UPDATE work_units SET state = $2 WHERE id = $1", unit, str(after))
                    moved = True
                except asyncpg.CheckViolationError as exc:
                    assert f"cannot go from {before} to {after}" in str(exc)
                    moved = False
                assert moved == (after in UNIT_TRANSITIONS[before]), (before, after)
                # Staying in a state is not a change (extending a lease, retargeting a version).
                await conn.execute("UPDATE work_units SET version = version WHERE id = $1", unit)
        finally:
            await conn.close()
            await db.close()

    asyncio.run(main())


def test_transition_queries_check_where_they_start(migrated_url: str) -> None:
    """A result that arrives for a unit something else already moved changes nothing."""

    async def main() -> None:
        db = await Database.open(migrated_url)
        try:
            run_id = await _run(db)
            w = (await db.fetchrow("api_register", "w", "host", "cpu", None, None))["worker_id"]
            await db.execute("insert_units", run_id, json.dumps(
                [{"seq": s, "step": 0, "version": 0, "epoch": 0, "indices": [s], "noise_seed": s} for s in range(3)]))
            # Inserting the same schedule again (a publish retried after a lost reply) adds nothing.
            await db.execute("insert_units", run_id, json.dumps(
                [{"seq": s, "step": 0, "version": 0, "epoch": 0, "indices": [s], "noise_seed": s} for s in range(3)]))
            assert await db.fetchval("unit_counts", run_id) is not None
            ids = []
            for _ in range(3):
                unit = await db.fetchrow("api_claim", w, run_id, 60.0)
                assert await db.fetchval("api_submit", w, unit["id"], 1, b"x") == "stored"
                ids.append(unit["id"])
            grads = {r["unit_id"]: r["id"] for r in await db.fetch("pending_gradients", run_id)}
            assert len(grads) == 3
            # The step closed on its deadline: everything open is cancelled (results deleted).
            await db.execute("cancel_open_units", run_id, 0)
            conn = await asyncpg.connect(migrated_url)
            try:
                states = dict(await conn.fetch("SELECT id, state FROM work_units WHERE run_id = $1", run_id))
                assert set(states.values()) == {"cancelled"}
                # Late verdicts on those results move nothing (and raise nothing).
                await db.execute("consume_gradient", grads[ids[0]], ids[0])
                await db.execute("drop_gradient", grads[ids[1]], ids[1])
                assert await db.fetchval("reject_gradient", grads[ids[2]], ids[2], run_id, w, "late", 3) is None
                assert set(dict(await conn.fetch("SELECT id, state FROM work_units WHERE run_id = $1",
                                                 run_id)).values()) == {"cancelled"}
                assert await conn.fetchval("SELECT count(*) FROM work_units WHERE run_id = $1", run_id) == 3
            finally:
                await conn.close()
        finally:
            await db.close()

    asyncio.run(main())


def test_lost_results_are_requeued_and_kept_results_are_not(migrated_url: str) -> None:
    """What a crash leaves: units marked done, the UNLOGGED gradients table empty."""

    async def main() -> None:
        db = await Database.open(migrated_url)
        conn = await asyncpg.connect(migrated_url)
        try:
            run_id = await _run(db)
            w = (await db.fetchrow("api_register", "w", "host", "cpu", None, None))["worker_id"]
            await db.execute("insert_units", run_id, json.dumps(
                [{"seq": s, "step": s, "version": 0, "epoch": 0, "indices": [s], "noise_seed": s} for s in range(3)]))
            done = []
            for _ in range(3):
                unit = await db.fetchrow("api_claim", w, run_id, 60.0)
                assert await db.fetchval("api_submit", w, unit["id"], 1, b"x") == "stored"
                done.append(unit["id"])
            # Step 0's result survived; step 1's is gone (as after a crash); step 2's too,
            # but requeueing from step 1 on is asked for.
            await conn.execute("DELETE FROM gradients WHERE unit_id = ANY($1::bigint[])", done[1:])
            lost = [r["id"] for r in await db.fetch("requeue_lost_results", run_id, 1)]
            assert sorted(lost) == done[1:]
            states = dict(await conn.fetch("SELECT id, state FROM work_units WHERE run_id = $1", run_id))
            assert states == {done[0]: "done", done[1]: "pending", done[2]: "pending"}
            assert await db.fetch("requeue_lost_results", run_id, 0) == []  # step 0's result is there
        finally:
            await conn.close()
            await db.close()

    asyncio.run(main())


def test_worker_vocabulary_is_the_schema_s(migrated_url: str) -> None:
    async def main() -> None:
        db = await Database.open(migrated_url)
        conn = await asyncpg.connect(migrated_url)
        try:
            w = (await db.fetchrow("api_register", "w", "host", "cpu", None, None))["worker_id"]
            for state in REPORTED_WORKER_STATES:
                await db.fetchval("api_heartbeat", w, str(state), None)
                assert await conn.fetchval("SELECT state FROM workers WHERE id = $1", w) == state
            with pytest.raises(asyncpg.InvalidParameterValueError, match="worker state must be"):
                await db.fetchval("api_heartbeat", w, "offline", None)  # only leaving sets it
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute("UPDATE workers SET state = 'sleeping' WHERE id = $1", w)
            await db.fetch("api_leave", w)
            assert await conn.fetchval("SELECT state FROM workers WHERE id = $1", w) == WorkerState.OFFLINE
            check = await conn.fetchval("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                                        "WHERE conname = 'workers_state_check'")
            assert {str(s) for s in WorkerState} == {s for s in WorkerState if f"'{s}'" in check}
            assert check.count("'") == 2 * len(WorkerState)
        finally:
            await conn.close()
            await db.close()

    asyncio.run(main())


def test_psql_shows_the_diagram(migrated_url: str) -> None:
    async def main() -> str:
        conn = await asyncpg.connect(migrated_url)
        try:
            return await conn.fetchval(
                "SELECT col_description('work_units'::regclass, attnum) FROM pg_attribute "
                "WHERE attrelid = 'work_units'::regclass AND attname = 'state'")
        finally:
            await conn.close()

    comment = asyncio.run(main())
    for state in UnitState:
        assert state in comment
    assert "cancelled (final)" in comment and "claim" in comment
