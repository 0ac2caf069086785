"""Least privilege against a real PostgreSQL: every role against every table and API function,
and what a curious student with the class URL tries, as that student's own login. (Logins
made and used through the CLI: tests/acceptance/test_roles_cli.py.)"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from ganns_async.db import Database
from helpers import ClassLogins, drop_logins

TABLES = ["runs", "weights", "workers", "work_units", "gradients", "rejections", "events", "metrics",
          "ganns_migrations"]
VIEWS = ["ganns_view.runs", "ganns_view.workers", "ganns_view.metrics", "ganns_view.events", "ganns_view.weights"]
API = {  # function -> arguments that reach its body
    "ganns_api.active_run()": "",
    "ganns_api.register(text,text,text,text,text)": "'x', 'h', 'cpu', NULL, NULL",
    "ganns_api.heartbeat(bigint,text,bigint)": "-1, 'idle', NULL",
    "ganns_api.leave(bigint)": "-1",
    "ganns_api.claim(bigint,bigint,double precision)": "-1, -1, 60",
    "ganns_api.extend_lease(bigint,bigint,double precision)": "-1, -1, 60",
    "ganns_api.release(bigint,bigint)": "-1, -1",
    "ganns_api.weights(bigint,integer)": "-1, 0",
    "ganns_api.submit(bigint,bigint,integer,bytea)": "-1, -1, 0, ''::bytea",
    "ganns_api.report_unusable(bigint,bigint,text)": "-1, -1, 'x'",
    "ganns_api.rank(bigint)": "-1",
}
# The admin's call really makes this login, and roles belong to the whole server: a name of
# its own, so that runs sharing a server (xdist's workers, a DATABASE_URL) never collide,
# dropped after this file's tests.
PROBE_LOGIN = f"probe_{uuid.uuid4().hex[:12]}"
INTERNAL = ["ganns_api._trusted()", "ganns_api._clean('x', 1)", "ganns_api._own_worker(1)",
            f"ganns_admin.add_login('{PROBE_LOGIN}', NULL, 'worker')"]


@pytest.fixture(scope="module", autouse=True)
def _drop_probe_login(pg_server: str) -> Iterator[None]:
    yield
    asyncio.run(drop_logins(pg_server, [PROBE_LOGIN]))


async def _allowed(url: str, sql: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
        return True
    except asyncpg.exceptions.InsufficientPrivilegeError as exc:
        # "permission denied for table/function/schema": the privilege check, not a body's own refusal
        if "permission denied" in str(exc) or "must be owner" in str(exc):
            return False
        return True
    finally:
        await conn.close()


def _table_sql(table: str, op: str) -> str:
    # WHERE false: the privilege check is real, nothing changes.
    col = {"ganns_migrations": "name", "metrics": "step", "weights": "version"}.get(table, "id")
    return {"SELECT": f"SELECT 1 FROM {table} LIMIT 0",
            "INSERT": f"INSERT INTO {table} SELECT * FROM {table} WHERE false",
            "UPDATE": f"UPDATE {table} SET {col} = {col} WHERE false",
            "DELETE": f"DELETE FROM {table} WHERE false"}[op]


def test_every_role_against_every_table_view_and_function(class_logins: ClassLogins) -> None:
    coordinator_tables = set(TABLES) - {"ganns_migrations"}

    def expected_table(who: str, table: str, op: str) -> bool:
        if who == "admin":
            return True
        if table == "ganns_migrations":
            return op == "SELECT"
        return who == "instructor" and table in coordinator_tables

    async def main() -> dict[tuple[str, str, str], tuple[bool, bool]]:
        got = {}
        for who in ("admin", "instructor", "alice", "viewer"):
            url = class_logins.url(who)
            for table in TABLES:
                for op in ("SELECT", "INSERT", "UPDATE", "DELETE"):
                    got[(who, table, op)] = (await _allowed(url, _table_sql(table, op)), expected_table(who, table, op))
            for view in VIEWS:
                got[(who, view, "SELECT")] = (await _allowed(url, f"SELECT * FROM {view} LIMIT 0"), True)
                got[(who, view, "DELETE")] = (await _allowed(url, f"DELETE FROM {view} WHERE false"), who == "admin")
            for fn, args in API.items():
                name = fn.split("(")[0]
                got[(who, fn, "EXECUTE")] = (await _allowed(url, f"SELECT * FROM {name}({args})"),
                                             who in ("admin", "instructor", "alice"))
            for call in INTERNAL:
                got[(who, call, "EXECUTE")] = (await _allowed(url, f"SELECT {call}"), who == "admin")
        return got

    got = asyncio.run(main())
    wrong = {k: v for k, v in got.items() if v[0] != v[1]}
    assert not wrong, "\n".join(f"{k}: allowed={a}, expected={e}" for k, (a, e) in sorted(wrong.items()))
    # The matrix covered both answers for the student, not just refusals.
    assert any(a for (who, _t, _o), (a, _e) in got.items() if who == "alice")
    assert any(not a for (who, _t, _o), (a, _e) in got.items() if who == "alice")


async def _run_with_units(admin: str, n: int = 4) -> int:
    db = await Database.open(admin, max_size=1)
    try:
        run = await db.fetchrow("create_run", "{}", "fp", 1000)
        assert run is not None
        units = [{"seq": s, "step": 0, "version": 0, "epoch": 0, "indices": [s, s + 1], "noise_seed": s}
                 for s in range(n)]
        await db.execute("insert_units", run["id"], json.dumps(units))
        return int(run["id"])
    finally:
        await db.close()


def test_a_curious_student_cannot_change_the_run(class_logins: ClassLogins) -> None:
    """The attacks of the trust issue, each as the student's own login: all refused."""

    async def main() -> None:
        run_id = await _run_with_units(class_logins.admin)
        teacher = await asyncpg.connect(class_logins.instructor)
        bob_db = await Database.open(class_logins.bob, max_size=1)
        bob = (await bob_db.fetchrow("api_register", "laptop", "bob-host", "cpu", "Intel", None))["worker_id"]
        alice = await asyncpg.connect(class_logins.alice)
        try:
            attacks = [
                "SELECT hostname, cpu_info FROM workers",
                f"UPDATE workers SET images_done = 0 WHERE id = {bob}",
                f"UPDATE weights SET payload = '' WHERE run_id = {run_id}",
                f"UPDATE runs SET config = '{{\"lr\": 10}}' WHERE id = {run_id}",
                "INSERT INTO runs (config, dataset_fingerprint, dataset_size) VALUES ('{}', 'x', 1)",
                f"UPDATE runs SET status = 'stopped' WHERE id = {run_id}",
                "DROP TABLE gradients",
                f"ALTER ROLE {class_logins.names[0]} PASSWORD 'owned'",
                "CREATE TABLE public.work_unitz (id int)",
                f"SELECT ganns_api.heartbeat({bob}, 'idle', NULL)",  # bob's row, alice's login
                f"SELECT * FROM ganns_api.leave({bob})",
            ]
            for sql in attacks:
                with pytest.raises(asyncpg.exceptions.PostgresError):
                    await alice.execute(sql)
            # Ending the coordinator's session: refused, and the session lives on.
            pid = await teacher.fetchval("SELECT pg_backend_pid()")
            try:
                terminated = await alice.fetchval("SELECT pg_terminate_backend($1)", pid)
            except asyncpg.exceptions.InsufficientPrivilegeError:
                terminated = False
            assert terminated is False
            assert await teacher.fetchval("SELECT 1") == 1
            # Nothing changed.
            run = await teacher.fetchrow("SELECT status, config FROM runs WHERE id = $1", run_id)
            assert run["status"] == "running" and run["config"] == "{}"
            # A forged name is bound to the login: "bob" from alice's login is "alice/bob".
            me = await alice.fetchrow("SELECT * FROM ganns_api.register('bob', 'h', 'cpu', NULL, NULL)")
            assert me["worker_name"] == f"{class_logins.names[1]}/bob"
            # The student's session has the limits of its login.
            assert await alice.fetchval("SHOW statement_timeout") == "2min"
            assert await alice.fetchval("SHOW idle_in_transaction_session_timeout") == "1min"
        finally:
            await alice.close()
            await teacher.close()
            await bob_db.close()

    asyncio.run(main())


def test_the_api_sets_the_limits_not_the_client(class_logins: ClassLogins) -> None:
    async def main() -> None:
        run_id = await _run_with_units(class_logins.admin, n=4)
        admin = await asyncpg.connect(class_logins.admin)
        db = await Database.open(class_logins.alice, max_size=1)
        try:
            await admin.execute("UPDATE runs SET max_payload = 1000 WHERE id = $1", run_id)
            me = (await db.fetchrow("api_register", "", "h", "cpu", None, None))["worker_id"]
            # A lease of 1e9 seconds is 120 s.
            first = await db.fetchrow("api_claim", me, run_id, 1e9)
            lease = await admin.fetchval("SELECT extract(epoch FROM lease_until - now()) FROM work_units WHERE id = $1",
                                         first["id"])
            assert 100 < lease <= 120
            # Two units held at most per student.
            second = await db.fetchrow("api_claim", me, run_id, 60)
            assert second is not None
            assert await db.fetchrow("api_claim", me, run_id, 60) is None
            # A second machine of the same student does not get a third unit either.
            other = (await db.fetchrow("api_register", "second", "h2", "cpu", None, None))["worker_id"]
            assert await db.fetchrow("api_claim", other, run_id, 60) is None
            # Over the payload cap, or more samples than images: refused, unit back to pending.
            assert (await db.fetchval("api_submit", me, first["id"], 2, b"x" * 1001)).startswith("refused: payload")
            assert (await db.fetchval("api_submit", me, second["id"], 3, b"x")).startswith("refused: 3 samples")
            states = dict(await admin.fetch("SELECT id, state FROM work_units WHERE id = ANY($1::bigint[])",
                                            [first["id"], second["id"]]))
            assert states == {first["id"]: "pending", second["id"]: "pending"}
            assert await admin.fetchval("SELECT refused FROM workers WHERE id = $1", me) == 2
            # A unit refused for this login goes to someone else, never back to it.
            third = await db.fetchrow("api_claim", me, run_id, 60)
            assert third["id"] not in (first["id"], second["id"])
            # Names are checked by the table too, whoever writes them.
            with pytest.raises(asyncpg.exceptions.CheckViolationError):
                await admin.execute("INSERT INTO workers (name, hostname, device) VALUES ($1, 'h', 'cpu')",
                                    "evil\x1b]52;c;aGk=\x07")
            # Control characters in what a client sends are dropped before they are stored.
            row = await db.fetchrow("api_register", "lap\x1b[31mtop\u202e", "h\x07", "cpu\n", None, None)
            stored = await admin.fetchrow("SELECT name, hostname, device FROM workers WHERE id = $1", row["worker_id"])
            assert tuple(stored) == (f"{class_logins.names[1]}/lap[31mtop", "h", "cpu")
        finally:
            await db.close()
            await admin.close()

    asyncio.run(main())


def test_students_cannot_cancel_a_unit_by_reporting_it_unusable(class_logins: ClassLogins) -> None:
    """A report sends the unit to another login and counts against the reporter; only the
    instructor's machines can cancel a unit (tests/acceptance/test_recovery.py)."""

    async def main() -> None:
        run_id = await _run_with_units(class_logins.admin, n=1)
        dbs = {who: await Database.open(class_logins.url(who), max_size=1) for who in ("alice", "bob", "mallory")}
        admin = await asyncpg.connect(class_logins.admin)
        try:
            me = {who: (await db.fetchrow("api_register", "", "h", "cpu", None, None))["worker_id"]
                  for who, db in dbs.items()}
            unit = await dbs["alice"].fetchrow("api_claim", me["alice"], run_id, 60)
            assert await dbs["alice"].fetchval("api_report_unusable", me["alice"], unit["id"], "bad index") == "pending"
            assert await dbs["alice"].fetchrow("api_claim", me["alice"], run_id, 60) is None  # not back to her
            again = await dbs["bob"].fetchrow("api_claim", me["bob"], run_id, 60)
            assert again["id"] == unit["id"]
            assert await dbs["bob"].fetchval("api_report_unusable", me["bob"], unit["id"], "bad index") == "pending"
            assert await admin.fetchval("SELECT state FROM work_units WHERE id = $1", unit["id"]) == "pending"
            third = await dbs["mallory"].fetchrow("api_claim", me["mallory"], run_id, 60)
            assert third["id"] == unit["id"]
            reasons = [r["reason"] for r in await admin.fetch("SELECT reason FROM rejections ORDER BY id")]
            assert reasons == ["unusable: bad index"] * 2
        finally:
            for db in dbs.values():
                await db.close()
            await admin.close()

    asyncio.run(main())


def test_quarantine_holds_for_the_login_and_units_cannot_be_held_forever(class_logins: ClassLogins) -> None:
    async def main() -> None:
        run_id = await _run_with_units(class_logins.admin, n=6)
        admin = await asyncpg.connect(class_logins.admin)
        db = await Database.open(class_logins.alice, max_size=1)
        try:
            await admin.execute("UPDATE runs SET max_payload = 10 WHERE id = $1", run_id)
            me = (await db.fetchrow("api_register", "one", "h", "cpu", None, None))["worker_id"]
            # A lease renewed past the run's max_unit_s is not renewed: the unit goes to others.
            held = await db.fetchrow("api_claim", me, run_id, 60)
            assert await db.fetchval("api_extend_lease", me, held["id"], 60) is True
            await admin.execute("UPDATE work_units SET claimed_at = now() - interval '1 hour' WHERE id = $1",
                                held["id"])
            assert await db.fetchval("api_extend_lease", me, held["id"], 60) is False
            assert await db.fetchval("api_release", me, held["id"]) is True
            # Three refused results across the login's workers quarantine it ...
            for _ in range(3):
                unit = await db.fetchrow("api_claim", me, run_id, 60)
                assert (await db.fetchval("api_submit", me, unit["id"], 2, b"x" * 11)).startswith("refused")
            assert await db.fetchrow("api_claim", me, run_id, 60) is None
            assert await db.fetchval("api_heartbeat", me, "idle", run_id) == "3 units refused or reported"
            # ... and a new worker row of the same login starts no cleaner.
            fresh = (await db.fetchrow("api_register", "two", "h", "cpu", None, None))["worker_id"]
            assert await db.fetchrow("api_claim", fresh, run_id, 60) is None
            assert await admin.fetchval("SELECT quarantined FROM ganns_view.workers WHERE id = $1", me) is True
        finally:
            await db.close()
            await admin.close()

    asyncio.run(main())


def test_one_students_many_workers_do_not_widen_the_round(class_logins: ClassLogins) -> None:
    async def main() -> None:
        db = await Database.open(class_logins.alice, max_size=1)
        admin = await Database.open(class_logins.admin, max_size=1)
        try:
            for i in range(5):
                await db.fetchrow("api_register", f"m{i}", "h", "cpu", None, None)
            owner = await admin.fetchrow("api_register", "lab-pc", "h", "cpu", None, None)
            await admin.fetchrow("api_register", "lab-pc-2", "h", "cpu", None, None)
            # alice's five count as the two units she can hold; the instructor's machines all count.
            assert await admin.fetchval("online_workers_any", 60.0) == 2 + 2
            await admin.execute("quarantine_now", owner["worker_id"], "test")
            assert await admin.fetchval("online_workers_any", 60.0) == 2 + 1
        finally:
            await db.close()
            await admin.close()

    asyncio.run(main())
