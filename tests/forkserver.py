"""A fork server for the CLI processes the acceptance tests start.

Every acceptance test runs the real CLI (``python -m ganns_async ...``) in processes of its
own, over a hundred of them in a run of the suite, and each used to spend about 2.7 s of CPU
starting Python and importing torch before doing anything. On a 2-core machine that was a
fifth of the suite. The fork server is one Python process per test process that has
imported torch and ``ganns_async`` once. For each request it forks a child that takes the
requested standard streams, working directory, environment and arguments, and runs
``ganns_async``'s ``__main__`` as ``python -m`` would (or one of the tests' scripts, such as
``tests/acceptance/hostile_worker.py``, as ``python SCRIPT`` would). The child is a real, separate process:
it has its own pid, takes signals, can be SIGKILLed, and exits with its own code. Only
the interpreter's start-up and the imports are shared.

Start-up itself is not tested through here: ``tests/acceptance/test_cli_startup.py`` execs
a fresh interpreter. Any request whose environment differs from the server's in a variable
that a module may read when it is imported (anything but ``GANNS_*``, ``PG*``, ``PYTEST_*``,
``DATABASE_URL``, ``PYTHONUNBUFFERED``, ``PYTHONFAULTHANDLER`` and a few others listed below)
also execs, and so does every request when ``GANNS_TEST_EXEC=1`` is set. One family is
handled without an exec: huggingface_hub reads ``HF_*`` when it is imported (the cache
folder, the endpoint), so a child whose ``HF_*`` differ first drops huggingface_hub and
``ganns_async`` (the only modules that hold anything of it) and imports them afresh, as a
new interpreter would; torch stays.

How a child's exit status comes back: the server forks a small waiter for each request, and
the waiter forks the child. The waiter sends the child's pid over the request's socket, then
its exit status once it has reaped it. :class:`ForkedProcess` reads them, and answers like
``subprocess.Popen``.

Run as a script, this file is the server: ``python forkserver.py SOCKET``. The dashboard
tests start their processes as a tmux pane's command, on the pane's terminal:
:func:`terminal_command` gives that command, ``python forkserver.py --client SOCKET ARGS``,
a client that imports nothing heavy and has the server fork ``python ARGS`` onto its own
standard streams (the terminal), passes signals on, and exits with the child's status.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

# Read by the child at run time, not when a module is imported: a difference in these is
# safe to hand to a child of the server.
_RUNTIME_PREFIXES = ("GANNS_", "PG", "_GANNS", "PYTEST_")  # PYTEST_CURRENT_TEST changes every test
# TORCHINDUCTOR_CACHE_DIR: torch sets it in the test process when the first optimizer is
# made. It says where compiled kernels are cached, and nothing here compiles any.
_RUNTIME_NAMES = {"DATABASE_URL", "PYTHONUNBUFFERED", "PYTHONFAULTHANDLER", "COLUMNS", "LINES", "TORCHINDUCTOR_CACHE_DIR"}
# Read by huggingface_hub when it is imported: a child whose values differ imports these
# packages again (nothing else that the server imports holds a reference into them).
_REIMPORT_PREFIXES = ("HF_", "HUGGING_FACE_")
_REIMPORTED = ("huggingface_hub", "ganns_async")
_TESTS = Path(__file__).resolve().parent  # scripts under it (tests/acceptance/*.py) fork too
# What the CLI's commands import, at start-up or on first use (torch.optim imports
# torch._dynamo the first time an optimizer is made: 2 s of CPU).
_PRELOAD = ("torch", "torch._dynamo", "torchvision.utils", "matplotlib.figure", "matplotlib.backends.backend_agg",
            "matplotlib.ticker", "huggingface_hub", "ganns_async.cli", "ganns_async.worker",
            "ganns_async.coordinator", "ganns_async.local", "ganns_async.plots", "ganns_async.outputs",
            "ganns_async.model_card", "ganns_async.hub", "ganns_async.quality", "ganns_async.demo",
            "ganns_async.tui", "rich.console", "pydantic", "annotated_types",
            # Imported on first use: the model card's template, the generator folder's weights.
            "jinja2", "safetensors.torch")


# --- the server (this file run as a script) ----------------------------------------------


def _stream(fd: int, write: bool, unbuffered: bool) -> IO[str]:
    """A text stream on ``fd`` set up as Python's start-up sets up sys.stdin/stdout/stderr."""
    raw = io.FileIO(fd, "w" if write else "r", closefd=False)
    if not write:
        return io.TextIOWrapper(io.BufferedReader(raw), encoding=sys.stdin.encoding, errors=sys.stdin.errors)
    interactive = raw.isatty()
    # -u: unbuffered binary layer and a text layer that writes through (as python -u).
    binary = raw if unbuffered else io.BufferedWriter(raw)
    errors = "backslashreplace" if fd == 2 else sys.stdout.errors
    return io.TextIOWrapper(binary, encoding=sys.stdout.encoding, errors=errors,  # type: ignore[arg-type]
                            line_buffering=interactive or fd == 2, write_through=unbuffered)


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_child(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become the process ``python ARGV`` would have been, run, exit."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds) - {0, 1, 2}:
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if request.get("reimport"):
            for name in [n for n in sys.modules if n in _REIMPORTED or n.startswith(tuple(p + "." for p in _REIMPORTED))]:
                del sys.modules[name]
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin, sys.stdout, sys.stderr = _stream(0, False, False), _stream(1, True, unbuffered), _stream(2, True, unbuffered)
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
        if os.environ.get("PYTHONFAULTHANDLER"):
            import faulthandler

            faulthandler.enable()
        argv: list[str] = request["argv"]
        import runpy

        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                sys.path[0] = os.getcwd()
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                sys.path[0] = str(Path(argv[0]).resolve().parent)
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except KeyboardInterrupt:
            # As Python itself does: an unhandled Ctrl-C ends the process by SIGINT.
            _shutdown()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # noqa: BLE001 - printed as the interpreter would
            import traceback

            traceback.print_exc()
            code = 1
        _shutdown()
    finally:
        os._exit(code)


def _shutdown() -> None:
    """What the interpreter does on its way out: wait for non-daemon threads (the default
    executor's included), run the atexit functions, flush the streams."""
    import atexit as _atexit

    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        _atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()


def _serve_one(listener: socket.socket, conn: socket.socket) -> None:
    """In the waiter: fork the child, report its pid, reap it, report its exit status."""
    listener.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            conn.close()
            _run_child(request, fds)
        for fd in fds:
            os.close(fd)
        conn.sendall(f"pid {pid}".encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}".encode())
    except BaseException as exc:  # noqa: BLE001 - reported to the client, which raises it
        with contextlib.suppress(OSError):
            conn.sendall(f"error {type(exc).__name__}: {exc}".encode())
    finally:
        os._exit(0)


def serve(path: str) -> None:
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    with open(path + ".env.json", "w") as fh:  # for clients that decide whether they may fork
        json.dump(dict(os.environ), fh)
    print("ready", flush=True)
    # The client holds our stdin open; when it goes away (the test process ended, even by
    # SIGKILL), stdin reads EOF and the server ends too.
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            return
        if listener in ready:
            conn, _ = listener.accept()
            if os.fork() == 0:
                _serve_one(listener, conn)
            conn.close()


# --- the client (the test process) -------------------------------------------------------


class ForkedProcess:
    """A child of the fork server, answered like ``subprocess.Popen``: ``pid``, ``poll``,
    ``wait``, ``send_signal``, ``terminate``, ``kill``, ``returncode``."""

    def __init__(self, args: list[str], conn: socket.socket) -> None:
        self.args = args
        self.returncode: int | None = None
        self._conn = conn
        reply = conn.recv(256).decode()
        if not reply.startswith("pid "):
            conn.close()
            raise OSError(f"the fork server could not start {args!r}: {reply or 'no answer'}")
        self.pid = int(reply.split()[1])

    def _collect(self, timeout: float | None) -> bool:
        if self.returncode is not None:
            return True
        ready, _, _ = select.select([self._conn], [], [], timeout)
        if not ready:
            return False
        reply = self._conn.recv(256).decode()
        self._conn.close()
        if not reply.startswith("exit "):
            raise OSError(f"the fork server lost {self.args!r}: {reply or 'no answer'}")
        self.returncode = int(reply.split()[1])
        return True

    def poll(self) -> int | None:
        self._collect(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._collect(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Server:
    def __init__(self, env: dict[str, str]) -> None:
        self._dir = tempfile.mkdtemp(prefix="ganns-forkserver-")
        self.path = os.path.join(self._dir, "socket")
        self.env = env
        log = open(os.path.join(self._dir, "server.log"), "wb")  # noqa: SIM115 - the server's own stderr
        self._proc = subprocess.Popen([sys.executable, __file__, self.path], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=log, cwd=os.getcwd(), env=env)
        log.close()
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if line.strip() != b"ready":
            raise OSError(f"the fork server did not start; see {self._dir}/server.log")

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)  # the socket, its env.json, the server's log


_server: _Server | None = None
_server_lock = threading.Lock()
_base_env: dict[str, str] | None = None


def capture_environment() -> None:
    """Take the environment the server will start with from now: call it once the test
    session has set its variables up, so that a test which happens to start the server with
    a variable of its own set (monkeypatch.setenv) does not make every later request exec."""
    global _base_env
    _base_env = dict(os.environ)


def _get_server() -> _Server:
    global _server
    with _server_lock:
        if _server is None:
            _server = _Server(_base_env if _base_env is not None else dict(os.environ))
            atexit.register(_server.close)
        return _server


def _forkable(env: dict[str, str], server_env: dict[str, str]) -> tuple[bool, bool]:
    """Whether a child of the server, started with ``server_env``, can run with ``env``, and
    whether it must import huggingface_hub and ganns_async again to do so."""
    reimport = False
    for name in set(env) | set(server_env):
        if env.get(name) == server_env.get(name) or name in _RUNTIME_NAMES or name.startswith(_RUNTIME_PREFIXES):
            continue
        if not name.startswith(_REIMPORT_PREFIXES):
            return False, False
        reimport = True
    return True, reimport


def popen(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
          stdout: IO[Any] | int | None = None, stderr: IO[Any] | int | None = None
          ) -> subprocess.Popen[bytes] | ForkedProcess:
    """``subprocess.Popen([sys.executable, *argv], ...)``, forked from the server when it can
    be: ``-m ganns_async ...`` or a script of the tests (see the module's docstring). ``stdout``/``stderr``: a file, ``subprocess.STDOUT``
    (stderr only) or None (inherit); stdin is always /dev/null."""
    full_env = dict(os.environ if env is None else env)
    wanted = os.environ.get("GANNS_TEST_EXEC") != "1" and (argv[:2] == ["-m", "ganns_async"]
                                                          or Path(argv[0]).parent.parent == _TESTS)
    server = _get_server() if wanted else None
    forkable, reimport = _forkable(full_env, server.env) if server is not None else (False, False)
    if server is None or not forkable:
        return subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                env=full_env, cwd=cwd)

    def fd_of(stream: IO[Any] | int | None, inherit: int) -> int:
        if stream is None:
            return inherit
        return stream if isinstance(stream, int) else stream.fileno()

    out = fd_of(stdout, 1)
    err = out if stderr == subprocess.STDOUT else fd_of(stderr, 2)
    with open(os.devnull, "rb") as devnull:
        return _request(server.path, argv, full_env, str(cwd or os.getcwd()), reimport, [devnull.fileno(), out, err])


def _request(path: str, argv: list[str], env: dict[str, str], cwd: str, reimport: bool,
             fds: list[int]) -> ForkedProcess:
    request = {"argv": argv, "env": env, "cwd": cwd, "reimport": reimport}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(path)
    socket.send_fds(conn, [json.dumps(request).encode()], fds)
    return ForkedProcess(argv, conn)


def terminal_command(argv: list[str]) -> list[str]:
    """The command line that runs ``python ARGV`` on the terminal it is started on (a tmux
    pane), forked from this process's server (see the module's docstring)."""
    if os.environ.get("GANNS_TEST_EXEC") == "1" or argv[:2] != ["-m", "ganns_async"]:
        return [sys.executable, *argv]
    return [sys.executable, __file__, "--client", _get_server().path, *argv]


def _client(path: str, argv: list[str]) -> int:
    """``python ARGV`` forked from the server at ``path`` onto this process's standard
    streams; a fresh interpreter (exec) where the environment rules that out."""
    with open(path + ".env.json") as fh:
        server_env = json.load(fh)
    env = dict(os.environ)
    forkable, reimport = _forkable(env, server_env)
    if not forkable:
        os.execv(sys.executable, [sys.executable, *argv])
    child = _request(path, argv, env, os.getcwd(), reimport, [0, 1, 2])

    def pass_on(number: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, number)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, pass_on)
    code = child.wait()
    return code if code >= 0 else 128 - code  # a shell's $? for a child ended by a signal


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """``subprocess.run([sys.executable, *argv], capture_output=True, text=True, ...)``
    through :func:`popen`."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = popen(argv, env=env, cwd=cwd, stdout=out, stderr=err)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        decode = io.TextIOWrapper  # the locale's encoding and universal newlines, as text=True
        return subprocess.CompletedProcess([sys.executable, *argv], code, decode(out).read(), decode(err).read())


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        sys.exit(_client(sys.argv[2], sys.argv[3:]))
    serve(sys.argv[1])
