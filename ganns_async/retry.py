"""One retry policy for every process, and a watch on the tasks a process cannot live without.

:class:`Backoff` is the only backoff in the project: the worker's and the coordinator's
reconnects, the listener's and the Hub pusher's retries all wait by it. Delays double from
``base`` up to ``cap``; with ``jitter`` (the default) each is drawn from the upper half of
that range, so forty workers cut off by the same server restart do not come back in step.

:class:`SideTasks` holds a process's background tasks (heartbeat, listener, run-lock watch,
pushes). A side task that dies would leave the process half-alive: a worker whose heartbeat
died loses every lease it holds, a coordinator whose listener died never hears of a result.
So when one ends, the process says which and why, and its main loop stops.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from ganns_async.errors import UserError

T = TypeVar("T")


@dataclass
class Backoff:
    """Exponential backoff: ``base * 2**n`` seconds after the n-th consecutive failure, at most ``cap``."""

    base: float = 0.5
    cap: float = 15.0
    jitter: bool = True
    failures: int = 0

    def ceiling(self, failures: int) -> float:
        return min(self.cap, self.base * 2 ** min(failures, 32))

    def next_delay(self) -> float:
        """The delay before the next try; counts one more failure."""
        top = self.ceiling(self.failures)
        self.failures += 1
        return random.uniform(top / 2, top) if self.jitter else top

    def reset(self) -> None:
        """A success: the next failure waits ``base`` again."""
        self.failures = 0

    async def wait(self, log: logging.Logger, what: str, exc: BaseException) -> float:
        """Log why, then sleep the next delay; returns it."""
        delay = self.next_delay()
        log.warning("%s: %s; retrying in %.1fs", what, describe_error(exc), delay)
        await asyncio.sleep(delay)
        return delay


def describe_error(exc: BaseException) -> str:
    """``TypeName: message`` on one line (connection errors often have an empty message)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def retrying(fn: Callable[[], Awaitable[T]], *, log: logging.Logger, what: str,
                   retry_on: tuple[type[BaseException], ...] = (),
                   retry_if: Callable[[BaseException], bool] | None = None, backoff: Backoff | None = None) -> T:
    """Call ``fn`` until it returns, waiting by ``backoff`` after each error that is one of
    ``retry_on`` or that ``retry_if`` accepts.

    ``fn`` must be safe to repeat: the error may have come after its commit (the reply was
    lost, not the work). Anything else, and cancellation, goes straight through.
    """
    backoff = backoff or Backoff()
    while True:
        try:
            return await fn()
        except Exception as exc:
            if not (isinstance(exc, retry_on) or (retry_if is not None and retry_if(exc))):
                raise
            await backoff.wait(log, what, exc)


class SideTaskDied(UserError):
    """A background task the process needs has ended; the process stops instead of limping on."""

    exit_code = 3


class SideTasks:
    """Background tasks watched on behalf of a main task.

    A task started here is expected to run until it is cancelled. When one ends on its own,
    with an error or without, :attr:`failure` is set and the main task (see :meth:`guard`) is
    cancelled at once, wherever it waits, and ends with that failure instead. (A coordinator
    whose run lock a rival took must not finish publishing the step it was retrying.)
    """

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.failure: UserError | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: asyncio.Task[Any] | None = None

    async def guard(self, main: Awaitable[T]) -> T:
        """Await ``main`` in the current task; if a side task dies meanwhile, raise its failure."""
        self._main = asyncio.current_task()
        try:
            self.check()
            return await main
        except asyncio.CancelledError:
            if self.failure is None:
                raise
            assert self._main is not None
            self._main.uncancel()
            raise self.failure from None
        finally:
            self._main = None

    def start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        return self.watch(asyncio.create_task(coro, name=name))

    def watch(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or self.failure is not None:
            return
        exc = task.exception()
        if isinstance(exc, UserError):
            self.failure = exc  # it says what happened and what to do
        else:
            why = describe_error(exc) if exc is not None else "it returned"
            self.failure = SideTaskDied(f"the {task.get_name()} task stopped ({why}); stopping this process "
                                        "rather than running without it")
        self.log.error("%s", self.failure)
        if self._main is not None:
            self._main.cancel()

    def check(self) -> None:
        """Raise if a side task has died."""
        if self.failure is not None:
            raise self.failure

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        self._tasks.clear()
        for t in tasks:
            t.remove_done_callback(self._ended)
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
