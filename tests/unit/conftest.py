"""The unit tier: no PostgreSQL and no subprocess. A test that needs either belongs in
tests/integration/ (a real PostgreSQL, in this process) or tests/acceptance/ (subprocesses)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

PG_FIXTURE_NAMES = ("pg_server", "db_url", "migrated_url", "class_logins")


@pytest.fixture
def pg_server() -> None:
    """Overrides the session's server for this tier, so that none is ever started for it."""
    pytest.fail("unit tests use no PostgreSQL: move this test to tests/integration/ or tests/acceptance/")


@pytest.fixture(autouse=True)
def _unit_tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail a unit test that asks for a PostgreSQL fixture or starts a subprocess."""
    wanted = sorted(set(request.fixturenames) & set(PG_FIXTURE_NAMES))
    if wanted:
        pytest.fail(f"unit tests use no PostgreSQL, but this one asks for {', '.join(wanted)}: "
                    "move it to tests/integration/ (or tests/acceptance/ if it starts subprocesses)")
    tried: list[str] = []

    class NoSubprocess:
        def __init__(self, args: object, *_a: object, **_kw: object) -> None:
            tried.append(repr(args))
            raise AssertionError(f"unit tests start no subprocess, but this one ran {args!r}: "
                                 "move it to tests/acceptance/")

    def no_spawn(name: str):  # type: ignore[no-untyped-def]
        def refuse(*args: object, **_kw: object) -> None:
            tried.append(f"{name}{args!r}")
            raise AssertionError(f"unit tests start no subprocess, but this one called os.{name}{args!r}: "
                                 "move it to tests/acceptance/")
        return refuse

    monkeypatch.setattr(subprocess, "Popen", NoSubprocess)
    for name in ("system", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, no_spawn(name))
    yield
    if tried:  # even where the code under test swallowed the error
        pytest.fail(f"unit tests start no subprocess, but this one tried: {'; '.join(tried)}")
