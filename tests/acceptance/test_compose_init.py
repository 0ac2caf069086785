"""compose.yaml's first start, without Docker: what the official image's entrypoint does
with the files compose hands it, against the real test PostgreSQL.

The entrypoint runs every file of /docker-entrypoint-initdb.d in sorted order with
``psql -v ON_ERROR_STOP=1 --no-psqlrc -f FILE`` in POSTGRES_DB, as POSTGRES_USER (the
superuser), in a database initdb has just made. Here: a fresh database on the test server,
its superuser, the same psql options, and the list of files derived from the parsed
compose.yaml and the folders it binds (tests/helpers.py, compose_initdb_files; the file
itself: tests/unit/test_compose.py). Then every migration must be recorded as applied, as
`ganns-async db status` reports it to ops.
"""

from __future__ import annotations

import subprocess

from ganns_async.embedded import psql_binary
from ganns_async.migrate import load_migrations, status
from helpers import REPO, _run, cli, compose_initdb_files, compose_postgres_service, load_compose


def test_first_start_applies_every_migration(db_url: str) -> None:
    _, server = compose_postgres_service(load_compose())
    files = compose_initdb_files(server)
    assert files, "compose.yaml hands the entrypoint nothing to run"
    psql = psql_binary()
    assert psql, "no psql binary found (neither the embedded server's nor the system's)"
    for name, path in files:
        # A *.sh would be run or sourced by the entrypoint's shell; compose hands it only SQL.
        assert name.endswith(".sql"), name
        r = subprocess.run([psql, "-v", "ON_ERROR_STOP=1", "--no-password", "--no-psqlrc", "-f", str(path), db_url],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"the entrypoint would stop the first start at {name}:\n{r.stdout}\n{r.stderr}"

    known = [m.name for m in load_migrations(REPO / "sql")]
    rows = _run(status(db_url))
    assert [(row.name, row.applied) for row in rows] == [(name, True) for name in known]
    assert all(row.checksum_ok is None for row in rows), "psql records no checksum: db migrate fills it in"

    # What ops sees: every migration "applied (by psql)", and exit 0 (1 when one is pending).
    r = cli("db", "status", "--db", db_url)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == known, r.stdout
    assert all("applied (by psql)" in line for line in lines), r.stdout
