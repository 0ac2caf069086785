"""Which database a command means, and how it is shown: a URL, or libpq's environment
(connecting through it: tests/integration/test_database_env.py)."""

from __future__ import annotations

import pytest

from ganns_async.db import FROM_ENVIRONMENT, database_url, describe_url, with_environment
from ganns_async.errors import UserError
from ganns_async.logins import login_url

LIBPQ = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSSLMODE", "PGSERVICE")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LIBPQ:
        monkeypatch.delenv(name, raising=False)


def test_a_url_is_taken_as_it_is() -> None:
    url = "postgresql://u:pw@db.example:5432/ganns"
    assert database_url(url) == url
    with pytest.raises(UserError, match="bad database URL"):
        database_url("mysql://u:pw@db.example/ganns")


@pytest.mark.parametrize("how", [{}, {"PGPASSWORD": "hunter2"}, {"PGSSLMODE": "require", "PGHOSTADDR": "10.0.0.1"}])
def test_nothing_names_a_database(monkeypatch: pytest.MonkeyPatch, how: dict[str, str]) -> None:
    """How to connect (a password, TLS; PGHOSTADDR, which asyncpg does not read) is not which
    database: the error says what to pass."""
    for name, value in how.items():
        monkeypatch.setenv(name, value)
    for given in (None, ""):
        with pytest.raises(UserError, match="no database given: pass --db") as err:
            database_url(given)
        assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("name", ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE"])
def test_one_libpq_variable_that_names_a_target_is_enough(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "5433" if name == "PGPORT" else "x")
    assert database_url(None) == FROM_ENVIRONMENT


def test_the_environment_is_shown_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "db.example")
    monkeypatch.setenv("PGPORT", "6432")
    monkeypatch.setenv("PGUSER", "teacher")
    monkeypatch.setenv("PGDATABASE", "class")
    monkeypatch.setenv("PGPASSWORD", "hunter2")
    monkeypatch.setenv("PGSSLMODE", "require")
    assert describe_url(FROM_ENVIRONMENT) == "postgresql://teacher@db.example:6432/class (from the PG* variables)"
    assert with_environment(FROM_ENVIRONMENT) == "postgresql://teacher@db.example:6432/class?sslmode=require"
    # A URL keeps what it says; only what it leaves out comes from the variables.
    assert describe_url("postgresql://alice:pw@other/ganns") == "postgresql://alice@other:6432/ganns"
    monkeypatch.setenv("PGSERVICE", "klass")
    assert describe_url(FROM_ENVIRONMENT) == "service 'klass' (PGSERVICE)"


def test_a_socket_folder_stays_a_query_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "/run/postgresql")
    monkeypatch.setenv("PGPORT", "5433")
    assert with_environment(FROM_ENVIRONMENT) == "postgresql://?host=/run/postgresql&port=5433"
    assert describe_url(FROM_ENVIRONMENT) == "postgresql:///run/postgresql:5433 (from the PG* variables)"


def test_a_login_made_through_the_environment_names_server_and_database(monkeypatch: pytest.MonkeyPatch) -> None:
    """The person gets a whole URL, not the admin's environment (nor its user or password)."""
    monkeypatch.setenv("PGHOST", "db.example")
    monkeypatch.setenv("PGUSER", "admin")
    monkeypatch.setenv("PGPASSWORD", "hunter2")
    monkeypatch.setenv("PGSSLMODE", "verify-full")
    url = login_url(FROM_ENVIRONMENT, "alice", "pw", database="class")
    assert url == "postgresql://alice:pw@db.example/class?sslmode=verify-full"
    monkeypatch.setenv("PGDATABASE", "ganns")  # the variable, when set, is what the admin reached
    assert login_url(FROM_ENVIRONMENT, "alice", None, database="ganns") == (
        "postgresql://alice@db.example/ganns?sslmode=verify-full")
