"""Logins through the real CLI: `db add-student` prints a URL that logs in as a worker, and a
login in the wrong role gets one line, not a traceback."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from helpers import ClassLogins, cli, drop_logins


def test_add_student_cli_prints_a_url_that_logs_in_as_a_worker(migrated_url: str) -> None:
    name = f"s{uuid.uuid4().hex[:8]}"
    try:
        done = cli("db", "add-student", name, "--db", migrated_url, "--password", "pw")
        assert done.returncode == 0, done.stderr
        url = done.stdout.strip().splitlines()[-1]
        assert f"{name}:pw@" in url

        async def check() -> None:
            conn = await asyncpg.connect(url)
            try:
                assert await conn.fetchval("SELECT session_user") == name
                assert await conn.fetchval("SELECT pg_has_role($1, 'ganns_worker', 'MEMBER')", name)
            finally:
                await conn.close()

        asyncio.run(check())
        again = cli("db", "add-student", name, "--db", migrated_url)
        assert again.returncode != 0 and "exists already" in again.stderr
        assert "Traceback" not in again.stderr
        bad = cli("db", "add-student", "Robert'); DROP TABLE runs;--", "--db", migrated_url)
        assert bad.returncode != 0 and "login names are" in bad.stderr
    finally:
        asyncio.run(drop_logins(migrated_url, [name]))


def test_a_login_in_the_wrong_role_gets_one_line_not_a_traceback(class_logins: ClassLogins, synth_zip) -> None:  # type: ignore[no-untyped-def]
    data = ["--data", str(synth_zip)]
    tries = [("worker", "--db", class_logins.viewer, *data, "--no-tui"),
             ("coordinator", "--db", class_logins.alice, *data, "--no-tui", "--max-steps", "1"),
             ("control", "pause", "--db", class_logins.alice)]
    for args in tries:
        done = cli(*args, timeout=120)
        assert done.returncode != 0, (args, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr and "permission denied" in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
