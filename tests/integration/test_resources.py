"""What the class brings (sql/005_resources.sql) against a real PostgreSQL: the migration on top
of 004, workers telling their hardware as student logins, hostile numbers not believed, the
previous release's call, and the totals a viewer gets without seeing any one worker's
hardware. (psql applying the file: tests/acceptance/test_resources_psql.py; the line on the
screen: tests/unit/test_dashboard_resources.py.)"""

from __future__ import annotations

import asyncio
import json
import re

import asyncpg
import pytest
from rich.console import Console

from ganns_async.cluster_state import STALE_AFTER_S, read_snapshot
from ganns_async.dashboard import ClassResources, GpuModel, render_cluster
from ganns_async.db import Database
from ganns_async.hardware import Resources
from ganns_async.migrate import load_migrations, migrate
from ganns_async.store import WorkerStore
from helpers import ClassLogins

GIB = 2**30
TIB = 2**40
NEW_REGISTER = "ganns_api.register(text,text,text,text,text,bigint,bigint,bigint,text)"
FACTS = "SELECT cpu_cores, gpu_count, gpu_memory_bytes, gpu_name FROM workers WHERE id = $1"
GPU_NAME = re.compile(r"^[A-Za-z0-9 ._()/+-]{1,64}$")


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def _render(renderable: object, width: int) -> str:
    console = Console(record=True, width=width, color_system="truecolor", force_terminal=True)
    console.print(renderable)
    return console.export_text(clear=False)


def test_005_applies_on_top_of_004_with_db_migrate(db_url: str) -> None:
    async def main() -> None:
        files = load_migrations()
        assert [m.name for m in files][:5] == ["001_schema", "002_bounded", "003_roles", "004_states",
                                               "005_resources"]
        conn = await asyncpg.connect(db_url)
        try:
            for m in files[:4]:  # a class's database of the previous release, as psql -f left it
                await conn.execute(m.sql)
            old = await conn.fetchrow("SELECT * FROM ganns_api.register('lab-pc', 'h', 'cpu', 'Intel', NULL)")
            assert await migrate(db_url) == ["005_resources"]
            assert await migrate(db_url) == []  # applied once: skipped from now on
            rows = dict(await conn.fetch("SELECT name, checksum FROM ganns_migrations"))
            assert rows["005_resources"] == files[4].checksum
            # The old row is still there, its hardware unknown, and it counts as online.
            assert tuple(await conn.fetchrow(FACTS, old["worker_id"])) == (None, None, None, None)
            totals = await conn.fetchrow("SELECT * FROM ganns_view.class_resources()")
            assert (totals["workers"], totals["reporting"], totals["cpu_cores"]) == (1, 0, 0)
            checks = {r["conname"] for r in await conn.fetch(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'workers'::regclass AND contype = 'c'")}
            assert checks >= {"workers_cpu_cores_sane", "workers_gpu_count_sane", "workers_gpu_memory_sane",
                              "workers_gpu_name_sane", "workers_gpu_facts_need_a_gpu"}
        finally:
            await conn.close()

    _run(main())


def test_students_register_their_hardware(class_logins: ClassLogins) -> None:
    async def main() -> None:
        alice = await Database.open(class_logins.alice, max_size=1)
        bob = await Database.open(class_logins.bob, max_size=1)
        admin = await asyncpg.connect(class_logins.admin)
        try:
            gpu = Resources(cpu_cores=8, gpu_count=1, gpu_memory_bytes=12 * GIB, gpu_name="NVIDIA GeForce RTX 3060")
            a, name = await WorkerStore(alice).register("laptop", "alice-pc", "cuda:0", "Ryzen", "RTX", gpu)
            assert name == f"{class_logins.names[1]}/laptop"
            b, _ = await WorkerStore(bob).register("", "bob-pc", "cpu", "Intel", None, Resources(4, 0, None, None))
            assert tuple(await admin.fetchrow(FACTS, a)) == (8, 1, 12 * GIB, "NVIDIA GeForce RTX 3060")
            assert tuple(await admin.fetchrow(FACTS, b)) == (4, 0, None, None)
            # Without resources the store still registers (hardware unknown).
            c, _ = await WorkerStore(bob).register("second", "bob-pc", "cpu", None, None)
            assert tuple(await admin.fetchrow(FACTS, c)) == (None, None, None, None)
        finally:
            await alice.close()
            await bob.close()
            await admin.close()

    _run(main())


# (cores, gpus, memory, name) a student sends -> what the server keeps
HOSTILE = [
    ((-4, 1, -1, "Tesla T4"), (None, 1, None, "Tesla T4")),
    ((0, 0, 10**12, "RTX 4090"), (None, 0, None, None)),  # memory and a name need a GPU
    ((10**12, 5, 2 * TIB, None), (None, None, None, None)),
    ((None, None, None, None), (None, None, None, None)),
    ((1024, 1, TIB, "A" * 100), (1024, 1, TIB, "A" * 64)),  # the top of every range is allowed
    ((1025, -1, 0, "x"), (None, None, None, None)),
    ((2, 1, 0, "\U0001f600\u202e\x1b "), (2, 1, None, None)),  # nothing printable left: no name
]


def test_hostile_numbers_are_not_believed(class_logins: ClassLogins) -> None:
    """As psql would send them, from mallory's own login: out of range is NULL (unknown), the
    registration goes on; a value that is not even a bigint fails the call."""

    async def main() -> None:
        mallory = await asyncpg.connect(class_logins.mallory)
        teacher = await asyncpg.connect(class_logins.instructor)
        admin = await asyncpg.connect(class_logins.admin)
        call = "SELECT * FROM ganns_api.register('m', 'h', 'cuda', NULL, NULL, $1, $2, $3, $4)"
        try:
            for sent, kept in HOSTILE:
                me = await mallory.fetchrow(call, *sent)
                assert tuple(await admin.fetchrow(FACTS, me["worker_id"])) == kept, sent
                await mallory.execute("SELECT * FROM ganns_api.leave($1)", me["worker_id"])  # stay within 8 online
            # Escapes, bidi and markup are cut out of a GPU's name; what is left passes the CHECK.
            me = await mallory.fetchrow(call, 8, 1, 8 * GIB, "\x1b]52;c;aGk=\x07RTX\u202e 4090 [bold]\U0001f600")
            name = await admin.fetchval("SELECT gpu_name FROM workers WHERE id = $1", me["worker_id"])
            assert GPU_NAME.match(name) and "RTX" in name and "4090" in name and "\x1b" not in name
            # 1e30 is no bigint: no such function, nothing stored.
            before = await admin.fetchval("SELECT count(*) FROM workers")
            with pytest.raises(asyncpg.exceptions.UndefinedFunctionError):
                await mallory.fetch("SELECT * FROM ganns_api.register('m', 'h', 'cpu', NULL, NULL, 1e30, 0, NULL, NULL)")
            with pytest.raises((OverflowError, asyncpg.exceptions.DataError)):
                await mallory.fetch(call, 10**30, 0, None, None)
            assert await admin.fetchval("SELECT count(*) FROM workers") == before
            # The student writes no column directly; the CHECKs bind even the instructor's psql.
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await mallory.execute("UPDATE workers SET cpu_cores = 1024 WHERE id = $1", me["worker_id"])
            for bad in ("cpu_cores = 5000", "cpu_cores = 0", "gpu_count = 2", "gpu_memory_bytes = 2 * 1099511627776",
                        "gpu_name = 'RTX [bold]'", "gpu_name = ''", "gpu_count = 0"):
                with pytest.raises(asyncpg.exceptions.CheckViolationError):
                    await teacher.execute(f"UPDATE workers SET {bad} WHERE id = $1", me["worker_id"])
            # The registration limits hold on the new call too: 8 workers online per login.
            for i in range(7):
                await mallory.fetchrow(call, 1024, 1, TIB, f"w{i}")
            with pytest.raises(asyncpg.exceptions.ProgramLimitExceededError, match="8 workers online"):
                await mallory.fetchrow(call, 1024, 1, TIB, "ninth")
        finally:
            await mallory.close()
            await teacher.close()
            await admin.close()

    _run(main())


def test_the_previous_releases_call_still_registers(class_logins: ClassLogins) -> None:
    async def main() -> None:
        alice = await Database.open(class_logins.alice, max_size=1)
        admin = await asyncpg.connect(class_logins.admin)
        try:
            # "api_register" is the five-argument call of the previous release, as it sends it.
            row = await alice.fetchrow("api_register", "old", "h\x07", "cpu", "Intel i5", None)
            assert row["worker_name"] == f"{class_logins.names[1]}/old"
            stored = await admin.fetchrow("SELECT hostname, cpu_info, login, cpu_cores, gpu_count, gpu_memory_bytes, "
                                          "gpu_name FROM workers WHERE id = $1", row["worker_id"])
            assert tuple(stored) == ("h", "Intel i5", class_logins.names[1], None, None, None, None)
            # Both calls are the API's: students and the instructor may call them, nobody else.
            acl = await admin.fetch(
                "SELECT p.oid::regprocedure::text AS fn, a.grantee FROM pg_proc AS p "
                "CROSS JOIN LATERAL aclexplode(p.proacl) AS a "
                "WHERE p.oid = ANY(ARRAY['ganns_api.register(text,text,text,text,text)'::regprocedure, $1::regprocedure])",
                NEW_REGISTER)
            grantees = {(r["fn"], r["grantee"]) for r in acl}
            for fn in {r["fn"] for r in acl}:
                assert (fn, 0) not in grantees, f"{fn} is executable by PUBLIC"
            viewer = await asyncpg.connect(class_logins.viewer)
            try:
                for sql in ("SELECT * FROM ganns_api.register('v', 'h', 'cpu', NULL, NULL)",
                            "SELECT * FROM ganns_api.register('v', 'h', 'cpu', NULL, NULL, 1, 0, NULL, NULL)"):
                    with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                        await viewer.fetch(sql)
            finally:
                await viewer.close()
        finally:
            await alice.close()
            await admin.close()

    _run(main())


async def _class(logins: ClassLogins) -> dict[str, int]:
    """A class in every situation: who is on which run, online, stale, offline, old release."""
    dbs = {who: await Database.open(logins.url(who), max_size=1) for who in ("alice", "bob", "mallory", "instructor")}
    admin = await asyncpg.connect(logins.admin)
    try:
        run_id = await admin.fetchval("INSERT INTO runs (config, dataset_fingerprint, dataset_size) "
                                      "VALUES ('{}', 'fp', 100) RETURNING id")
        t4 = Resources(2, 1, 15 * GIB + 300 * 2**20, "Tesla T4")  # 15.3 GiB: "15 GiB"
        ids = {
            "alice": (await WorkerStore(dbs["alice"]).register(
                "", "a", "cuda", None, None, Resources(8, 1, 12 * GIB, "NVIDIA GeForce RTX 3060")))[0],
            "bob": (await WorkerStore(dbs["bob"]).register("", "b", "cpu", None, None, Resources(4, 0, None, None)))[0],
            "lab1": (await WorkerStore(dbs["instructor"]).register("lab1", "l1", "cuda", None, None, t4))[0],
            "lab2": (await WorkerStore(dbs["instructor"]).register("lab2", "l2", "cuda", None, None, t4))[0],
            "old": (await dbs["mallory"].fetchrow("api_register", "old", "m", "cpu", None, None))["worker_id"],
            "left": (await WorkerStore(dbs["mallory"]).register(
                "left", "m", "cuda", None, None, Resources(16, 1, 80 * GIB, "NVIDIA H100 80GB HBM3")))[0],
            "quiet": (await WorkerStore(dbs["mallory"]).register(
                "quiet", "m", "cuda", None, None, Resources(16, 1, 80 * GIB, "NVIDIA H100 80GB HBM3")))[0],
            "almost": (await WorkerStore(dbs["bob"]).register("almost", "b", "cpu", None, None,
                                                              Resources(6, 0, None, None)))[0],
        }
        await dbs["mallory"].fetch("api_leave", ids["left"])  # offline: not counted
        # Silent past the dashboards' stale mark: not counted; just inside it: counted.
        await admin.execute("UPDATE workers SET last_seen = now() - make_interval(secs => $2) WHERE id = $1",
                            ids["quiet"], STALE_AFTER_S + 5)
        await admin.execute("UPDATE workers SET last_seen = now() - make_interval(secs => $2) WHERE id = $1",
                            ids["almost"], STALE_AFTER_S - 5)
        # Everyone but bob's first worker has joined the run; bob's waits for it (run_id NULL).
        await admin.execute("UPDATE workers SET run_id = $1 WHERE id <> $2", run_id, ids["bob"])
        ids["run"] = run_id
        return ids
    finally:
        for db in dbs.values():
            await db.close()
        await admin.close()


EXPECTED = ClassResources(
    workers=6,  # alice, bob, lab1, lab2, old, almost
    unreported=1,  # old
    cpu_cores=8 + 4 + 2 + 2 + 6,
    gpus=3,
    gpu_memory_bytes=12 * GIB + 2 * (15 * GIB + 300 * 2**20),
    gpu_models=(GpuModel("Tesla T4", 15, 2), GpuModel("NVIDIA GeForce RTX 3060", 12, 1)),
)


def test_a_viewer_gets_the_class_totals_and_no_workers_hardware(class_logins: ClassLogins) -> None:
    async def main() -> None:
        ids = await _class(class_logins)
        viewer = await asyncpg.connect(class_logins.viewer)
        try:
            totals = await viewer.fetchrow("SELECT * FROM ganns_view.class_resources()")
            assert dict(totals) | {"gpu_models": json.loads(totals["gpu_models"])} == {
                "workers": 6, "reporting": 5, "cpu_cores": 22, "gpus": 3,
                "gpu_memory_bytes": EXPECTED.gpu_memory_bytes,
                "gpu_models": [{"name": "Tesla T4", "gib": 15, "count": 2},
                               {"name": "NVIDIA GeForce RTX 3060", "gib": 12, "count": 1}]}
            # No worker's hardware, host or free-text description, by any road.
            columns = {r["attname"] for r in await viewer.fetch(
                "SELECT attname FROM pg_attribute WHERE attrelid = 'ganns_view.workers'::regclass AND attnum > 0")}
            assert not columns & {"hostname", "cpu_info", "gpu_info", "cpu_cores", "gpu_count", "gpu_memory_bytes",
                                  "gpu_name", "login"}
            for sql in ("SELECT gpu_name, cpu_cores FROM workers", "SELECT hostname FROM public.workers"):
                with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                    await viewer.fetch(sql)
            with pytest.raises(asyncpg.exceptions.UndefinedColumnError):
                await viewer.fetch("SELECT gpu_name FROM ganns_view.workers")
            # The totals take no filter a viewer could narrow down to one worker.
            with pytest.raises(asyncpg.exceptions.UndefinedFunctionError):
                await viewer.fetch("SELECT * FROM ganns_view.class_resources($1)", ids["alice"])
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await viewer.fetch("SELECT ganns_api._within(1, 0, 2)")

            # The projector's snapshot, read with the viewer's login: the same totals, a line
            # that says them, and a workers panel that agrees on who is online.
            db = await Database.open(class_logins.viewer, max_size=1)
            try:
                snap = await read_snapshot(db, title="watch", leaderboard=True)
            finally:
                await db.close()
            assert snap.resources == EXPECTED
            text = _render(render_cluster(snap, 140, 40), 140)
            assert ("6 workers online · 22 CPU cores · 3 GPUs, 43 GiB GPU memory "
                    "(2x Tesla T4 15 GiB, 1x RTX 3060 12 GiB) · hardware unknown for 1") in text
            assert "workers · 6 online · 1 stale · 1 offline" in text
        finally:
            await viewer.close()

    _run(main())


def test_before_the_first_run_the_waiting_students_show(class_logins: ClassLogins) -> None:
    async def main() -> None:
        alice = await Database.open(class_logins.alice, max_size=1)
        try:
            await WorkerStore(alice).register("", "a", "cpu", None, None, Resources(8, 0, None, None))
        finally:
            await alice.close()
        db = await Database.open(class_logins.viewer, max_size=1)
        try:
            snap = await read_snapshot(db, title="watch")
        finally:
            await db.close()
        assert snap.run_id is None and snap.status == "waiting for a run"
        assert [w.name for w in snap.workers] == [class_logins.names[1]]
        assert snap.resources == ClassResources(1, 0, 8, 0, 0, ())
        text = _render(render_cluster(snap, 100, 30), 100)
        assert "1 worker online · 8 CPU cores · no GPU" in text and "no workers yet" not in text

    _run(main())
