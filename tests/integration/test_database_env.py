"""Where a command finds its database: --db, GANNS_DB_URL, DATABASE_URL, then libpq's
environment (PG* variables, ~/.pgpass, PGSERVICE), as psql does.

`db status` (quick, read-only) runs through typer's CliRunner in this process, with an
environment made for each case. The session's server (tests/conftest.py) trusts local
logins, so it cannot tell whether a password was sent: what .pgpass does is tested on a
throwaway PostgreSQL 15 with scram-sha-256 (helpers.pg15_cluster; skipped without it).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncpg
import pytest
from typer.testing import CliRunner

from ganns_async.cli import app
from helpers import drop_logins, pg15_cluster

UNREACHABLE = "postgresql://u:secretpw@127.0.0.1:1/db"  # port 1: connection refused
# Everything that could name a database, cleared for every case (None unsets a variable).
CLEAN = {name: None for name in ("GANNS_DB_URL", "DATABASE_URL", "PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER",
                                 "PGDATABASE", "PGPASSWORD", "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE")}


pytestmark = pytest.mark.usefixtures("keep_logging")


def run_cli(*args: str, home: Path, **env: str) -> object:
    """The CLI in this process, with nothing from the caller's environment naming a database,
    and HOME (where ~/.pgpass and ~/.pg_service.conf are looked for) at ``home``."""
    return CliRunner().invoke(app, list(args), prog_name="ganns-async", env={**CLEAN, "HOME": str(home), **env})


def libpq_parts(url: str) -> tuple[dict[str, str], str | None]:
    """The PG* variables that say what ``url`` says, and its password (kept apart)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    env = {"PGHOST": parts.hostname or query["host"], "PGUSER": unquote(parts.username or ""),
           "PGDATABASE": unquote(parts.path.lstrip("/"))}
    port = parts.port or query.get("port")
    if port:
        env["PGPORT"] = str(port)
    return env, (unquote(parts.password) if parts.password else None)


def write_pgpass(home: Path, line: str, mode: int = 0o600) -> Path:
    path = home / ".pgpass"
    path.write_text(line + "\n")
    path.chmod(mode)
    return path


def assert_all_applied(r) -> None:  # type: ignore[no-untyped-def]
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines and all(" applied" in line and "pending" not in line for line in lines), r.stdout


def assert_one_line_error(r, *words: str) -> str:  # type: ignore[no-untyped-def]
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# --- (a) DATABASE_URL alone ------------------------------------------------------------


def test_database_url_alone(migrated_url: str, tmp_path: Path) -> None:
    assert_all_applied(run_cli("db", "status", home=tmp_path, DATABASE_URL=migrated_url))


# --- (b) the PG* variables, the password from ~/.pgpass ---------------------------------


def test_pg_variables_name_the_database(migrated_url: str, tmp_path: Path) -> None:
    """PGHOST, PGPORT, PGUSER and PGDATABASE alone reach the test's database: every migration
    shows as applied, which the server's default database (named after the user) would not.
    A password, if the session's server has one, goes in ~/.pgpass, never in the environment."""
    env, password = libpq_parts(migrated_url)
    if password:
        write_pgpass(tmp_path, f"*:*:{env['PGDATABASE']}:{env['PGUSER']}:{password}")
    assert_all_applied(run_cli("db", "status", home=tmp_path, **env))


def test_pgpass_gives_the_password(tmp_path: Path) -> None:
    """On a server that checks passwords: right in ~/.pgpass (0600) gets in, with no password
    anywhere in the environment or the command; wrong, or the file readable by others (which
    asyncpg, like libpq, then ignores), is refused in one line that never shows it."""
    secret = "pgpass-" + uuid.uuid4().hex[:8]
    with pg15_cluster(password=secret) as url:
        env, password = libpq_parts(url)
        assert password == secret
        port = env["PGPORT"]
        # A Unix socket is "localhost" in .pgpass, as in libpq.
        write_pgpass(tmp_path, f"localhost:{port}:postgres:postgres:{secret}")
        r = run_cli("db", "status", home=tmp_path, **env)
        assert r.exit_code == 1 and "pending" in r.stdout, r.output  # logged in; a fresh database

        no_pgpass = tmp_path / "elsewhere"
        no_pgpass.mkdir()
        line = assert_one_line_error(run_cli("db", "status", home=no_pgpass, **env), "(from the PG* variables)")
        assert "postgres@" in line and "PGHOST" in line

        write_pgpass(tmp_path, f"localhost:{port}:postgres:postgres:wrong-{secret}")
        r = run_cli("db", "status", home=tmp_path, **env)
        line = assert_one_line_error(r, "authentication failed", "(from the PG* variables)", "~/.pgpass")
        assert secret not in r.output

        write_pgpass(tmp_path, f"localhost:{port}:postgres:postgres:{secret}", mode=0o644)
        with pytest.warns(UserWarning, match="group or world access"):
            r = run_cli("db", "status", home=tmp_path, **env)
        assert_one_line_error(r, "authentication failed", "~/.pgpass (mode 0600)")


def test_pgservice_names_a_service(migrated_url: str, tmp_path: Path) -> None:
    """asyncpg reads a service file only for a DSN that names the service, and ignores
    PGSERVICE itself; the CLI names it for asyncpg."""
    env, password = libpq_parts(migrated_url)
    lines = ["[ganns_class]", f"host={env['PGHOST']}", f"user={env['PGUSER']}", f"dbname={env['PGDATABASE']}"]
    if "PGPORT" in env:
        lines.append(f"port={env['PGPORT']}")
    if password:
        write_pgpass(tmp_path, f"*:*:{env['PGDATABASE']}:{env['PGUSER']}:{password}")
    (tmp_path / ".pg_service.conf").write_text("\n".join(lines) + "\n")
    assert_all_applied(run_cli("db", "status", home=tmp_path, PGSERVICE="ganns_class"))


def test_a_login_made_through_the_environment_gets_a_whole_url(migrated_url: str, tmp_path: Path) -> None:
    """`db add-login` by an admin connected through PG* variables prints a URL that names
    the server and the database itself: the person who gets it has no such variables."""
    env, password = libpq_parts(migrated_url)
    if password:
        write_pgpass(tmp_path, f"*:*:{env['PGDATABASE']}:{env['PGUSER']}:{password}")
    name = f"tv{uuid.uuid4().hex[:8]}"
    try:
        r = run_cli("db", "add-login", name, "--role", "viewer", home=tmp_path, **env)
        assert r.exit_code == 0, r.output
        url = r.stdout.strip().splitlines()[-1]

        async def who() -> tuple[str, str]:
            conn = await asyncpg.connect(url)
            try:
                row = await conn.fetchrow("SELECT current_user, current_database()")
                return row[0], row[1]
            finally:
                await conn.close()

        assert asyncio.run(who()) == (name, env["PGDATABASE"])
    finally:
        asyncio.run(drop_logins(migrated_url, [name]))


# --- (c) nothing at all ------------------------------------------------------------------


def test_nothing_to_connect_with(tmp_path: Path) -> None:
    """No URL and no PG* variable that names a server, login or database: one line saying what
    to pass. PGPASSWORD and PGSSLMODE say how to connect, not where, so they change nothing."""
    for extra in ({}, {"PGPASSWORD": "hunter2", "PGSSLMODE": "require"}):
        r = run_cli("db", "status", home=tmp_path, **extra)
        assert_one_line_error(r, "no database given", "--db", "GANNS_DB_URL", "DATABASE_URL", "PGHOST", "~/.pgpass")
        assert "hunter2" not in r.output


# --- (d) which wins -----------------------------------------------------------------------


def test_db_option_wins_over_database_url(migrated_url: str, tmp_path: Path) -> None:
    assert_all_applied(run_cli("db", "status", "--db", migrated_url, home=tmp_path, DATABASE_URL=UNREACHABLE))
    # GANNS_DB_URL, the project's own variable, comes before the generic one.
    assert_all_applied(run_cli("db", "status", home=tmp_path, GANNS_DB_URL=migrated_url, DATABASE_URL=UNREACHABLE))
    # The loser is really read when it is alone: the same command fails on it.
    r = run_cli("db", "status", home=tmp_path, DATABASE_URL=UNREACHABLE)
    line = assert_one_line_error(r, "cannot reach PostgreSQL", "127.0.0.1:1", "DATABASE_URL")
    assert "secretpw" not in r.output and "secretpw" not in line
    assert os.environ.get("DATABASE_URL") != UNREACHABLE  # the runner restored the environment
