"""The one retry policy and the watch on side tasks (no database: pure asyncio)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from ganns_async.db import connect, lost_connection, lost_connection_in
from ganns_async.errors import UserError
from ganns_async.hub import push_backoff
from ganns_async.retry import Backoff, SideTaskDied, SideTasks, retrying

log = logging.getLogger("test")


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    b = Backoff(base=1.0, cap=8.0, jitter=False)
    assert [b.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    b.reset()
    assert b.next_delay() == 1.0


def test_jitter_stays_in_the_upper_half() -> None:
    b = Backoff(base=1.0, cap=8.0)
    for n in range(40):
        d = b.next_delay()
        top = min(8.0, 2.0 ** n)
        assert top / 2 <= d <= top


def test_hub_pushes_wait_by_the_same_policy() -> None:
    assert [push_backoff(n) for n in range(8)] == [0.0, 30.0, 60.0, 120.0, 240.0, 480.0, 600.0, 600.0]


def test_retrying_repeats_only_the_listed_errors() -> None:
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("cut")
        return "ok"

    async def broken() -> None:
        raise ValueError("a bug")

    async def main() -> None:
        fast = Backoff(base=0.001, cap=0.002)
        assert await retrying(flaky, log=log, what="x", retry_on=(OSError,), backoff=fast) == "ok"
        assert len(calls) == 3
        with pytest.raises(ValueError):
            await retrying(broken, log=log, what="x", retry_on=(OSError,), backoff=fast)

    asyncio.run(main())


def test_a_server_that_went_away_is_retried_a_wrong_login_is_not(tmp_path) -> None:
    """connect() turns errors into one-line UserErrors; lost_connection reads the cause, so
    start-up retries a server that is down or restarting but not a mistake in the URL."""
    async def refused() -> BaseException:
        # A socket path with no server behind it: the connection is refused.
        with pytest.raises(UserError) as info:
            await connect(f"postgresql://u@/db?host={tmp_path}&port=1")
        return info.value

    down = asyncio.run(refused())
    assert lost_connection(down) and lost_connection(ConnectionResetError())
    assert not lost_connection(UserError("database does not exist at ..."))
    assert not lost_connection(ValueError("a bug"))

    attempts = []

    async def starting() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise down
        return "started"

    async def wrong_login() -> None:
        raise UserError("authentication failed")

    async def main() -> None:
        fast = Backoff(base=0.001, cap=0.002)
        assert await retrying(starting, log=log, what="x", retry_if=lost_connection, backoff=fast) == "started"
        with pytest.raises(UserError, match="authentication"):
            await retrying(wrong_login, log=log, what="x", retry_if=lost_connection, backoff=fast)

    asyncio.run(main())
    assert len(attempts) == 2


def test_a_dead_side_task_stops_the_main_task_with_its_reason() -> None:
    async def main() -> None:
        side = SideTasks(log)

        async def heartbeat() -> None:
            await asyncio.sleep(0.01)
            raise RuntimeError("boom")

        async def forever() -> None:
            await asyncio.Event().wait()  # the main loop, waiting for work

        side.start(heartbeat(), "heartbeat")
        with pytest.raises(SideTaskDied, match="the heartbeat task stopped .RuntimeError: boom."):
            await asyncio.wait_for(side.guard(forever()), 5)
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    asyncio.run(main())


def test_a_side_task_s_user_error_is_passed_on_as_it_is() -> None:
    async def main() -> None:
        side = SideTasks(log)

        async def lock_keeper() -> None:
            raise UserError("run 3 is now coordinated by another process")

        async def forever() -> None:
            await asyncio.Event().wait()

        side.start(lock_keeper(), "run-lock")
        with pytest.raises(UserError, match="coordinated by another process"):
            await asyncio.wait_for(side.guard(forever()), 5)

    asyncio.run(main())


def test_cancelling_the_main_task_is_not_mistaken_for_a_side_task_death() -> None:
    async def main() -> None:
        side = SideTasks(log)

        async def fine() -> None:
            await asyncio.Event().wait()

        side.start(fine(), "listener")
        task = asyncio.create_task(side.guard(asyncio.Event().wait()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert side.failure is None
        await side.cancel_all()
        assert side.failure is None  # cancelled side tasks are not deaths

    asyncio.run(main())


def test_parallel_fetches_that_lose_the_connection_together_count_as_one_lost_connection() -> None:
    """The coordinator folds results in a TaskGroup; a server restart fails them as a group.
    A group of nothing but lost connections is one (the loop retries it); anything else in
    it is a real error and stays a group."""
    shut = asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command")
    gone = asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    assert lost_connection_in(ExceptionGroup("fetches", [shut, gone])) is shut
    assert lost_connection_in(ExceptionGroup("fetches", [ExceptionGroup("inner", [gone]), shut])) is gone
    assert lost_connection_in(ExceptionGroup("fetches", [shut, ValueError("a bug")])) is None
    assert lost_connection_in(ExceptionGroup("fetches", [KeyError("a bug")])) is None
    # The same test as the retry loop's: a refused reconnect (a UserError caused by a lost
    # connection) is one too; one caused by anything else is not.
    refused = UserError("cannot connect to the database: the server is starting up")
    refused.__cause__ = asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
    assert lost_connection_in(ExceptionGroup("fetches", [refused, shut])) is refused
    wrong = UserError("cannot connect: password authentication failed")
    wrong.__cause__ = asyncpg.exceptions.InvalidPasswordError("password authentication failed")
    assert lost_connection_in(ExceptionGroup("fetches", [wrong])) is None


@pytest.mark.parametrize(("error", "retried"), [
    (asyncpg.exceptions.DiskFullError('could not extend file "base/1/2": No space left on device'), True),
    (asyncpg.exceptions.OutOfMemoryError("out of memory"), True),
    (asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"), True),
    (asyncpg.exceptions.DeadlockDetectedError("deadlock detected"), True),
    (asyncpg.exceptions.SerializationError("could not serialize access due to concurrent update"), True),
    # The same query would fail the same way again: these go straight through.
    (asyncpg.exceptions.ConfigurationLimitExceededError("temporary file size exceeds temp_file_limit"), False),
    (asyncpg.exceptions.UniqueViolationError("duplicate key value violates unique constraint"), False),
    (asyncpg.exceptions.InsufficientPrivilegeError("permission denied for table weights"), False),
])
def test_a_server_out_of_resources_or_breaking_a_deadlock_is_waited_out(error: Exception, retried: bool) -> None:
    """What the operator fixes (disk, memory, connection slots) and what PostgreSQL says to
    retry (a transaction rolled back by a deadlock or a serialization failure) are waited
    out like a lost connection, by the one retry policy every process uses."""
    assert lost_connection(error) is retried
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        return "done"

    async def main() -> str:
        return await retrying(flaky, log=log, what="test", retry_if=lost_connection, backoff=Backoff(base=0.001))

    if retried:
        assert asyncio.run(main()) == "done" and calls == 2
    else:
        with pytest.raises(type(error)):
            asyncio.run(main())
        assert calls == 1
