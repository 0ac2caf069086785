"""`ganns-async metrics export`: rows the admin inserts come back through the CSV, value for
value, for every login that may read the metrics views (sql/003_roles.sql).

The CLI runs through typer's CliRunner in this process, against the test's own database.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import uuid
from datetime import datetime
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner

from ganns_async.cli import app
from ganns_async.export import COLUMNS
from ganns_async.logins import login_url
from helpers import ClassLogins, drop_logins

# Values that must survive the trip: the shortest repr of a double, a tiny one, NaN-free
# negatives, and an SWD that is only measured now and then (NULL elsewhere).
ROWS = [
    (0, 0, 0, 0, None, None, None, None, 263.25),
    (1, 0, 32, 2, 0.6931471805599453, 1.3862943611198906, 0.5000000000000001, 0.49999999999999994, None),
    (2, 0, 32, 2, 2.5e-308, -0.0, 0.75, 0.125, None),
    (3, 1, 64, 4, 12.0, 1e-3, 0.9999, 1.1754943508222875e-38, 124.0625),
]


pytestmark = pytest.mark.usefixtures("keep_logging")


def export(*args: str, db: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["metrics", "export", *args, "--db", db], prog_name="ganns-async",
                              env={"GANNS_RUN": None, "GANNS_METRICS_CSV": None})


async def _insert(admin: str, rows: list[tuple]) -> tuple[int, int]:  # type: ignore[type-arg]
    """Two runs: the first with ``rows``, the newer one empty. Returns their ids."""
    conn = await asyncpg.connect(admin)
    try:
        ids = []
        for _ in range(2):
            ids.append(await conn.fetchval(
                "INSERT INTO runs (config, dataset_fingerprint, dataset_size) VALUES ($1, 'fp', 100) RETURNING id",
                json.dumps({})))
        await conn.executemany(
            "INSERT INTO metrics (run_id, step, epoch, images, units, g_loss, d_loss, d_x, d_g_z, swd)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)", [(ids[0], *r) for r in rows])
        return ids[0], ids[1]
    finally:
        await conn.close()


def parse(text: str) -> list[dict[str, str]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    assert tuple(header) == COLUMNS
    return [dict(zip(header, line)) for line in reader]


def assert_rows_equal(got: list[dict[str, str]], run_id: int) -> None:
    assert [int(r["step"]) for r in got] == [r[0] for r in ROWS]
    for row, want in zip(got, ROWS):
        assert int(row["run_id"]) == run_id
        assert datetime.fromisoformat(row["created_at"]).tzinfo is not None
        assert (int(row["epoch"]), int(row["images"]), int(row["units"])) == want[1:4]
        for name, value in zip(("g_loss", "d_loss", "d_x", "d_g_z", "swd"), want[4:]):
            if value is None:
                assert row[name] == "", (name, row[name])
            else:
                parsed = float(row[name])
                assert parsed == value and math.copysign(1, parsed) == math.copysign(1, value), (name, row[name])


@pytest.mark.parametrize("who", ["instructor", "viewer", "alice"])
def test_export_to_a_file_reads_back_equal(class_logins: ClassLogins, tmp_path: Path, who: str) -> None:
    """The instructor's, the projector's and a student's login all read ganns_view.metrics."""
    run_id, _newer = asyncio.run(_insert(class_logins.admin, ROWS))
    dest = tmp_path / "metrics.csv"
    dest.write_text("an older export\n")  # replaced, not appended to
    r = export("--csv", str(dest), "--run", str(run_id), db=class_logins.url(who))
    assert r.exit_code == 0, r.output
    assert f"run {run_id}: 4 metrics row(s) written to {dest}" in r.stderr
    assert_rows_equal(parse(dest.read_text(encoding="utf-8")), run_id)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left behind


def test_export_to_stdout_and_the_newest_run_by_default(class_logins: ClassLogins) -> None:
    run_id, newer = asyncio.run(_insert(class_logins.admin, ROWS))
    r = export("--csv", "-", "--run", str(run_id), db=class_logins.viewer)
    assert r.exit_code == 0, r.output
    assert_rows_equal(parse(r.stdout), run_id)

    # Without --run: the newest run, which has no metrics yet: the header alone.
    r = export("--csv", "-", db=class_logins.viewer)
    assert r.exit_code == 0, r.output
    assert r.stdout == ",".join(COLUMNS) + "\n"
    assert f"run {newer}: 0 metrics row(s)" in r.stderr and "header only" in r.stderr


def one_line_error(r) -> str:  # type: ignore[no-untyped-def]
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_unknown_run_and_no_run(class_logins: ClassLogins, migrated_url: str, tmp_path: Path) -> None:
    dest = tmp_path / "metrics.csv"
    r = export("--csv", str(dest), db=migrated_url)
    assert "no run yet" in one_line_error(r)
    run_id, newer = asyncio.run(_insert(class_logins.admin, ROWS))
    r = export("--csv", str(dest), "--run", str(newer + 100), db=class_logins.instructor)
    line = one_line_error(r)
    assert f"no run {newer + 100}" in line and f"the newest is run {newer}" in line
    assert not dest.exists()


def test_unwritable_destination_is_refused_before_the_database(tmp_path: Path) -> None:
    """Checked before connecting: the URL here leads nowhere, and the error is about the path."""
    nowhere = "postgresql://u:secretpw@127.0.0.1:1/db"
    line = one_line_error(export("--csv", str(tmp_path / "missing" / "m.csv"), db=nowhere))
    assert "folder" in line and "does not exist" in line and str(tmp_path / "missing") in line
    line = one_line_error(export("--csv", str(tmp_path), db=nowhere))
    assert "it is a folder" in line
    file_as_folder = tmp_path / "file"
    file_as_folder.write_text("")
    line = one_line_error(export("--csv", str(file_as_folder / "m.csv"), db=nowhere))
    assert "cannot write" in line


def test_a_login_without_a_class_role_gets_one_line(migrated_url: str) -> None:
    """A login in none of the roles of sql/003_roles.sql reads nothing: one line says which will do."""
    name = f"tnr{uuid.uuid4().hex[:8]}"

    async def make() -> None:
        conn = await asyncpg.connect(migrated_url)
        try:
            await conn.execute(f'CREATE ROLE "{name}" LOGIN PASSWORD \'{name}-pw\'')
        finally:
            await conn.close()

    asyncio.run(make())
    try:
        line = one_line_error(export("--csv", "-", db=login_url(migrated_url, name, f"{name}-pw")))
        assert "may not read the metrics" in line and "instructor, viewer or student" in line
    finally:
        asyncio.run(drop_logins(migrated_url, [name]))
