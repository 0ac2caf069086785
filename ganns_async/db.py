"""The one module that talks to asyncpg.

Everything else calls named queries from ``queries.sql`` through :class:`Database`,
or listens through :class:`Listener`. Connection failures become one-line
:class:`UserError` messages here, so no caller has to know asyncpg's exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import asyncpg

from ganns_async.errors import UserError
from ganns_async.retry import Backoff
from ganns_async.waiting import wait_event

log = logging.getLogger(__name__)

# Channels the schema's triggers notify (see sql/001_schema.sql).
UNITS_CHANNEL = "ganns_units"
GRADIENTS_CHANNEL = "ganns_gradients"
CONTROL_CHANNEL = "ganns_control"
WEIGHTS_CHANNEL = "ganns_weights"
WORKERS_CHANNEL = "ganns_workers"
EVENTS_CHANNEL = "ganns_events"

CONNECT_TIMEOUT_S = 10.0
# No statement may hang a process forever on a half-dead connection: after this long the
# query is cancelled and the caller's retry policy takes over. Large enough for a model's
# blobs over a slow link; the short exchanges (claim, heartbeat) pass a shorter timeout.
COMMAND_TIMEOUT_S = 120.0
SHORT_TIMEOUT_S = 15.0

# Errors that mean "the server cannot serve us now": the connection is gone, the server is
# out of disk, memory or connection slots, or it rolled our transaction back to break a
# deadlock (a migration's DDL racing a step, say). Callers back off, reconnect if need be,
# and retry what is safe to repeat; nothing this process could do instead would help, and
# the operator's fix (free space, a restart) must find every process still there.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # A pooled connection that broke mid-query (the server shut down under it) can fail its
    # reset on release with "cannot switch to state ...; another operation is in progress";
    # the pool drops that connection, so the next try gets a fresh one.
    asyncpg.exceptions.InternalClientError,
    # SQLSTATE 53100, 53200, 53300: a write that cannot extend a file, a query the server has
    # no memory for, no free connection slot. Not 53400 (a limit such as temp_file_limit,
    # which the same query would exceed again).
    asyncpg.exceptions.DiskFullError,
    asyncpg.exceptions.OutOfMemoryError,
    asyncpg.exceptions.TooManyConnectionsError,
    # SQLSTATE 40001, 40P01: PostgreSQL's own advice for both is to retry the transaction.
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)


def lost_connection(exc: BaseException) -> bool:
    """The server went away (a connection error, or a reconnect refused because the server is
    down or starting up), as opposed to a wrong URL, login or database, which retrying
    cannot fix. :func:`connect` turns errors into UserError; the cause tells them apart."""
    cause = exc.__cause__ if isinstance(exc, UserError) else exc
    return isinstance(cause, CONNECTION_ERRORS)


def lost_connection_in(group: BaseExceptionGroup) -> BaseException | None:  # type: ignore[type-arg]
    """The first error of ``group`` when every error in it (nested groups included) means a
    lost connection (:func:`lost_connection`), else None. Parallel queries in a TaskGroup that lose their connection
    together fail as one group; the caller's retry policy knows single errors."""
    found: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> bool:  # type: ignore[type-arg]
        for exc in g.exceptions:
            if isinstance(exc, BaseExceptionGroup):
                if not walk(exc):
                    return False
            elif lost_connection(exc):
                found.append(exc)
            else:
                return False
        return True

    return found[0] if walk(group) and found else None


_NAME_RE = re.compile(r"^--\s*name:\s*(\S+)\s*$", re.MULTILINE)


@cache
def queries() -> dict[str, str]:
    """Parse ``queries.sql`` into ``{name: sql}`` once per process."""
    text = resources.files("ganns_async").joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME_RE.split(text)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        sql = body.strip()
        if name in found:
            raise RuntimeError(f"queries.sql: duplicate query name {name!r}")
        found[name] = sql
    return found


# --- which database: a URL, or libpq's environment ------------------------------------
#
# --db, GANNS_DB_URL and DATABASE_URL give a URL. Without one, asyncpg connects the way psql
# does: it reads PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD, PGSSLMODE, PGPASSFILE (and
# more) and the password file ~/.pgpass (only when it is mode 0600), for every part that no
# URL gives (asyncpg/connect_utils.py, _parse_connect_dsn_and_args). The variables below name
# *which* server, login or database; with none of them set there is nothing to connect to:
# asyncpg would try the local socket as the operating system's user, which is rarely the
# class's server, and "connection refused" there would not say what to pass. PGPASSWORD,
# PGSSLMODE and the like only say *how* to connect, so alone they choose nothing.
LIBPQ_TARGET_VARIABLES = ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE")
FROM_ENVIRONMENT = ""  # the URL value that means "libpq's environment"
NO_DATABASE = ("no database given: pass --db postgresql://USER@HOST:5432/DBNAME, or set GANNS_DB_URL, DATABASE_URL "
               "or libpq's PGHOST, PGUSER and PGDATABASE (the password then comes from ~/.pgpass or PGPASSWORD)")


def database_url(url: str | None) -> str:
    """What a command connects with: ``url`` (from --db, GANNS_DB_URL or DATABASE_URL, in that
    order), else FROM_ENVIRONMENT when libpq's variables name a database; else the one-line
    UserError that says what to pass. A bad URL is refused here too, before any work starts."""
    url = url or FROM_ENVIRONMENT
    _check_url(url)
    return url


def _environment_names_a_database() -> bool:
    return any(os.environ.get(name) for name in LIBPQ_TARGET_VARIABLES)


def _dsn(url: str) -> str | None:
    """What asyncpg gets. For the environment, nothing: asyncpg reads it itself. PGSERVICE is
    the exception: asyncpg 0.29-0.32 reads a service file only for a DSN that names the
    service, and ignores the variable, so the service is named in a DSN of its own."""
    if url:
        return url
    service = os.environ.get("PGSERVICE")
    return "postgresql://?" + urlencode({"service": service}) if service else None


def with_environment(url: str) -> str:
    """``url`` with the parts it leaves out taken from libpq's variables, as asyncpg takes
    them: host and port (PGHOST, PGPORT), user (PGUSER), database (PGDATABASE) and sslmode
    (PGSSLMODE); never a password. FROM_ENVIRONMENT gives the environment's own URL. For
    showing where a connection goes, and for building other logins' URLs."""
    env = os.environ
    parts = urlsplit(url or "postgresql://")
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = {k.lower() for k, _ in query}
    userinfo, _, hostport = parts.netloc.rpartition("@")
    host_given = bool(parts.hostname) or "host" in given
    if not host_given and env.get("PGHOST"):
        host = env["PGHOST"]
        if host.startswith("/") or "," in host:  # a socket folder or a list: only a query option can say it
            query.append(("host", host))
        else:
            hostport = f"[{host}]" if ":" in host else host
    if parts.port is None and "port" not in given and env.get("PGPORT"):
        if hostport:
            hostport += ":" + env["PGPORT"]
        else:
            query.append(("port", env["PGPORT"]))
    if not userinfo and "user" not in given and env.get("PGUSER"):
        userinfo = quote(env["PGUSER"], safe="")
    path = parts.path
    if path in ("", "/") and not given & {"dbname", "database"} and env.get("PGDATABASE"):
        path = "/" + quote(env["PGDATABASE"], safe="")
    if "sslmode" not in given and env.get("PGSSLMODE"):
        query.append(("sslmode", env["PGSSLMODE"]))
    netloc = f"{userinfo}@{hostport}" if userinfo else hostport
    options = urlencode(query, safe="/,")
    # Spelled out: urlunsplit would drop the // of a URL without a host.
    return f"{parts.scheme or 'postgresql'}://{netloc}{path}" + (f"?{options}" if options else "")


def describe_url(url: str) -> str:
    """Where ``url`` connects, without any password, fit to print (never raises). The parts
    the URL leaves out are shown as libpq's variables fill them in."""
    if url == FROM_ENVIRONMENT:
        service = os.environ.get("PGSERVICE")
        if service:
            return f"service {service!r} (PGSERVICE)"
        return f"{describe_url(with_environment(url))} (from the PG* variables)"
    if "://" not in url:
        return repr(url)
    try:
        parts = urlsplit(with_environment(url))
        q = dict(parse_qsl(parts.query))
        host = parts.hostname or q.get("host", "local socket")
        port = parts.port or q.get("port")
    except ValueError:
        return "<unparseable URL>"
    user = f"{parts.username}@" if parts.username else ""
    port = f":{port}" if port else ""
    service = f" (service {q['service']!r})" if "service" in q else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}{service}"


def _translate(url: str, exc: BaseException) -> UserError:
    where = describe_url(url)
    hint = ("check PGHOST, PGPORT, PGUSER, PGDATABASE and ~/.pgpass (mode 0600), or pass --db"
            if url == FROM_ENVIRONMENT else "check --db / GANNS_DB_URL / DATABASE_URL")
    if isinstance(exc, asyncpg.exceptions.InvalidPasswordError):
        return UserError(f"authentication failed for {where}: wrong user or password ({hint})")
    if isinstance(exc, asyncpg.exceptions.InvalidAuthorizationSpecificationError):
        return UserError(f"PostgreSQL refused the login for {where}: {exc} ({hint})")
    if isinstance(exc, asyncpg.exceptions.InvalidCatalogNameError):
        return UserError(f"database does not exist at {where}: create it (createdb) or {hint}")
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError) or isinstance(exc, ValueError):
        return UserError(f"bad database URL {where!s}: {exc} (expected postgresql://user:pass@host:5432/dbname)")
    if isinstance(exc, socket.gaierror):
        return UserError(f"cannot resolve the database host in {where}: {exc.strerror} ({hint})")
    if isinstance(exc, (ConnectionRefusedError, FileNotFoundError)):
        return UserError(f"cannot reach PostgreSQL at {where}: connection refused; is the server running? ({hint})")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return UserError(f"cannot reach PostgreSQL at {where}: timed out after {CONNECT_TIMEOUT_S:.0f}s ({hint})")
    if isinstance(exc, OSError):
        return UserError(f"cannot reach PostgreSQL at {where}: {exc.strerror or exc} ({hint})")
    if isinstance(exc, asyncpg.exceptions.PostgresError):
        return UserError(f"PostgreSQL at {where} refused the connection: {exc}")
    return UserError(f"cannot connect to {where}: {exc}")


def _check_url(url: str) -> None:
    if url == FROM_ENVIRONMENT:
        if not _environment_names_a_database():
            raise UserError(NO_DATABASE)
        return
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("postgres", "postgresql"):
        raise UserError(
            f"bad database URL {describe_url(url)!s}: expected postgresql://user:pass@host:5432/dbname"
        )
    try:
        urlsplit(url).port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise UserError(f"bad database URL: {exc} (expected postgresql://user:pass@host:5432/dbname)") from None


def _settings(application_name: str | None) -> dict[str, str] | None:
    """``application_name`` makes pg_stat_activity say who is who. PostgreSQL keeps
    printable ASCII only and cuts it at 63 bytes; we do the same so a hostile worker
    name cannot make the login fail."""
    if not application_name:
        return None
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in application_name)
    return {"application_name": clean[:63]}


async def connect(url: str, *, application_name: str | None = None) -> asyncpg.Connection:
    """One connection, for listeners, locks and migrations; errors become UserError."""
    _check_url(url)
    try:
        return await asyncpg.connect(_dsn(url), timeout=CONNECT_TIMEOUT_S, command_timeout=COMMAND_TIMEOUT_S,
                                     server_settings=_settings(application_name))
    except (Exception, asyncio.TimeoutError) as exc:  # noqa: BLE001 - translated for the user
        raise _translate(url, exc) from exc


class Database:
    """A small pool plus named queries. Only this class executes SQL."""

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self.pool = pool
        self.url = url

    @classmethod
    async def open(cls, url: str, *, max_size: int = 4, application_name: str | None = None) -> "Database":
        _check_url(url)
        try:
            pool = await asyncpg.create_pool(
                _dsn(url), min_size=1, max_size=max_size, timeout=CONNECT_TIMEOUT_S, command_timeout=COMMAND_TIMEOUT_S,
                server_settings=_settings(application_name),
                # Blobs are large; don't keep statement caches of them around.
                max_cacheable_statement_size=1024 * 15,
            )
        except (Exception, asyncio.TimeoutError) as exc:  # noqa: BLE001
            raise _translate(url, exc) from exc
        assert pool is not None
        return cls(pool, url)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pool.close(), 5)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator["Tx"]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield Tx(conn)

    async def fetch(self, name: str, *args: Any, timeout: float | None = None) -> list[asyncpg.Record]:
        return await self.pool.fetch(queries()[name], *args, timeout=timeout)

    async def fetchrow(self, name: str, *args: Any, timeout: float | None = None) -> asyncpg.Record | None:
        return await self.pool.fetchrow(queries()[name], *args, timeout=timeout)

    async def fetchval(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        return await self.pool.fetchval(queries()[name], *args, timeout=timeout)

    async def execute(self, name: str, *args: Any, timeout: float | None = None) -> str:
        return await self.pool.execute(queries()[name], *args, timeout=timeout)


class Tx:
    """Named queries inside one transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        return await self.conn.fetch(queries()[name], *args)

    async def fetchrow(self, name: str, *args: Any) -> asyncpg.Record | None:
        return await self.conn.fetchrow(queries()[name], *args)

    async def fetchval(self, name: str, *args: Any) -> Any:
        return await self.conn.fetchval(queries()[name], *args)

    async def execute(self, name: str, *args: Any) -> str:
        return await self.conn.execute(queries()[name], *args)

    async def execute_script(self, sql: str) -> None:
        """Run a whole migration file (it is the only SQL not in queries.sql)."""
        await self.conn.execute(sql)


class RunLock:
    """The run's advisory lock: one coordinator per run, for as long as it runs.

    The lock lives as long as its connection (a pooled one would drop it on release), so it
    gets a connection of its own, and :meth:`keep` watches it: when the connection dies (a
    server restart, a cut link) it reconnects with backoff and takes the lock again. If
    another process took the lock meanwhile, :meth:`keep` raises a one-line UserError and the
    coordinator stops: two coordinators must never drive one run.
    """

    def __init__(self, url: str, run_id: int, *, application_name: str | None = None) -> None:
        self.url = url
        self.run_id = run_id
        self.application_name = application_name
        self.retaken = 0  # how many times the lock was taken again after a lost connection
        self.lost_to_rival = False  # another session took it: the run is not ours to touch
        self._conn: asyncpg.Connection | None = None
        # Every backend we asked for the lock: one of ours may still hold it after a cut link
        # (the server has not noticed yet), even one whose reply to the lock query was lost.
        self._pids: set[int] = set()
        self._lost = asyncio.Event()

    async def acquire(self) -> bool:
        """Take the lock; False when another session holds it."""
        conn = await connect(self.url, application_name=self.application_name)
        earlier = set(self._pids)
        self._pids.add(conn.get_server_pid())  # known from the handshake, before any query
        try:
            got = await conn.fetchval(queries()["try_lock_run"], self.run_id)
            if not got and earlier:
                # After a cut link our old session may linger on the server, still holding
                # the lock; it is ours to end (same role), not a rival's.
                holder = await conn.fetchval(queries()["run_lock_holder"], self.run_id)
                if holder in earlier:
                    await conn.fetchval(queries()["end_backend"], holder)
                    for _ in range(50):
                        if await conn.fetchval(queries()["try_lock_run"], self.run_id):
                            got = True
                            break
                        await asyncio.sleep(0.1)  # the ended session lets go within moments
        except BaseException:
            conn.terminate()
            raise
        if not got:
            await conn.close()
            return False
        self._lost.clear()
        conn.add_termination_listener(lambda _c: self._lost.set())
        self._conn, self._pids = conn, {conn.get_server_pid()}  # older ones have let go
        return True

    async def keep(self) -> None:
        """Runs until cancelled; takes the lock again whenever its connection is lost."""
        while True:
            await self._lost.wait()
            self._drop()
            backoff = Backoff()
            while True:
                delay = backoff.next_delay()
                log.warning("run lock connection lost; taking the lock again in %.1fs", delay)
                await asyncio.sleep(delay)
                try:
                    if await self.acquire():
                        break
                except (UserError, *CONNECTION_ERRORS, asyncpg.PostgresError):
                    continue
                self.lost_to_rival = True
                raise UserError(f"run {self.run_id} is now coordinated by another process (it took the run's "
                                "lock while this coordinator's connection was down); stopping this one")
            self.retaken += 1
            log.info("run lock taken again")

    async def check(self) -> None:
        """Ping the lock's connection (the safety sweep calls this): a connection that died
        without a word is noticed within one sweep."""
        conn = self._conn
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.fetchval(queries()["ping"]), SHORT_TIMEOUT_S)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError):
            self._lost.set()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)
            conn.terminate()


class Listener:
    """LISTEN on a dedicated connection (a pooled one gets ``UNLISTEN *`` on release).

    Notifications are hints: ``on_notify(channel, payload)`` runs for each one, and
    ``on_reconnect()`` runs after every (re)connection because notifications sent while
    we were away are lost, so the caller must re-query its tables. The connection is
    pinged after ``ping_after`` seconds of silence so a dead socket is noticed.
    """

    def __init__(
        self,
        url: str,
        channels: Iterable[str],
        on_notify: Callable[[str, str], None],
        on_reconnect: Callable[[], None] | None = None,
        *,
        ping_after: float = 30.0,
        application_name: str | None = None,
    ) -> None:
        self.url = url
        self.channels = list(channels)
        self.on_notify = on_notify
        self.on_reconnect = on_reconnect
        self.ping_after = ping_after
        self.application_name = application_name
        self.connected = asyncio.Event()  # test and UI signal
        self.reconnects = 0
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> asyncio.Task[None]:
        """Connect once (failing fast with a UserError), then keep listening in the background;
        returns the background task (its owner watches it, see retry.SideTasks)."""
        await self._connect()
        self._task = asyncio.create_task(self._run(), name="listener")
        return self._task

    async def _connect(self) -> None:
        conn = await connect(self.url, application_name=self.application_name)
        self._lost.clear()
        conn.add_termination_listener(lambda _c: self._lost.set())
        try:
            for channel in self.channels:
                await conn.add_listener(channel, self._dispatch)
        except (Exception, asyncio.TimeoutError) as exc:  # noqa: BLE001 - dropped right after login
            conn.terminate()
            raise UserError(f"could not LISTEN: {exc}") from exc
        self._conn = conn
        self.connected.set()
        if self.on_reconnect is not None:
            self.on_reconnect()

    def _dispatch(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        self.on_notify(channel, payload)

    async def _run(self) -> None:
        while True:
            if not await wait_event(self._lost, self.ping_after):
                try:
                    assert self._conn is not None
                    await asyncio.wait_for(self._conn.fetchval(queries()["ping"]), 10)
                    continue
                except (*CONNECTION_ERRORS, asyncpg.PostgresError):
                    pass
            self.connected.clear()
            await self._drop()
            backoff = Backoff()
            while True:
                delay = backoff.next_delay()
                log.warning("listener connection lost; reconnecting in %.1fs", delay)
                await asyncio.sleep(delay)
                try:
                    await self._connect()
                except (UserError, *CONNECTION_ERRORS, asyncpg.PostgresError):
                    continue
                self.reconnects += 1
                log.info("listener reconnected")
                break

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)
            conn.terminate()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._drop()
