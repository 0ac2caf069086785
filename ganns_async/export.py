"""``ganns-async metrics export``: a run's training curves as CSV, for a spreadsheet or pandas.

The rows come from the ``ganns_view.metrics`` view (sql/003_roles.sql), which every class
role may read, so the instructor's, the projector's (viewer) and a student's login can all
export. One row per step the coordinator closed, as the dashboards plot them.
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ganns_async.errors import UserError

STDOUT = "-"
# The columns of ganns_view.metrics, in its order (the export_metrics query names them).
COLUMNS = ("run_id", "step", "created_at", "epoch", "images", "units", "g_loss", "d_loss", "d_x", "d_g_z", "swd")


@dataclass(frozen=True)
class Export:
    run_id: int
    rows: list[dict[str, Any]]


async def read_metrics(url: str, run: int | None) -> Export:
    """Every metrics row of run ``run`` (default: the newest run), in step order."""
    import asyncpg

    from ganns_async.db import Database
    from ganns_async.migrate import require_migrated

    db = await Database.open(url, max_size=1, application_name="ganns-async metrics")
    try:
        await require_migrated(db)
        found = await (db.fetchrow("view_latest_run") if run is None else db.fetchrow("view_run", run))
        if found is None:
            if run is None:
                raise UserError("the database holds no run yet: there are no metrics to export")
            newest = await db.fetchrow("view_latest_run")
            which = f"the newest is run {newest['id']}" if newest is not None else "it holds no run yet"
            raise UserError(f"no run {run} in this database ({which}); leave out --run for the newest")
        rows = await db.fetch("export_metrics", found["id"])
    except asyncpg.exceptions.InsufficientPrivilegeError as exc:
        raise UserError(f"this login may not read the metrics ({exc}): export needs an instructor, viewer or "
                        "student login (sql/003_roles.sql)") from None
    finally:
        await db.close()
    return Export(int(found["id"]), [dict(r) for r in rows])


def _cell(value: Any) -> Any:
    """A timestamp in ISO 8601; floats as Python writes them (they read back exactly); no value
    (SWD is measured only every --eval-every steps) as an empty cell."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def write_rows(out: IO[str], rows: Iterable[dict[str, Any]]) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    n = 0
    for row in rows:
        writer.writerow([_cell(row[c]) for c in COLUMNS])
        n += 1
    return n


def check_destination(dest: str) -> None:
    """Refuse a path that cannot be written before the database is asked anything."""
    if dest == STDOUT:
        return
    path = Path(dest)
    folder = path.parent
    if path.is_dir():
        raise UserError(f"cannot write {dest}: it is a folder; give a file name, e.g. {path / 'metrics.csv'}")
    if not folder.is_dir():
        raise UserError(f"cannot write {dest}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {dest}: folder {folder} is not writable")


def write_csv(dest: str, rows: Sequence[dict[str, Any]]) -> int:
    """Write the CSV to ``dest`` (``-``: stdout); a file is replaced atomically, so a reader
    (or a run of this command that was interrupted) never leaves half a file."""
    if dest == STDOUT:
        try:
            n = write_rows(sys.stdout, rows)
            sys.stdout.flush()
        except BrokenPipeError:
            # `| head` stopped reading: not an error. Point stdout at /dev/null so that the
            # interpreter's final flush does not complain either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return len(rows)
        return n
    check_destination(dest)
    path = Path(dest)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # os.open honours the umask, as the file a plain open() would make.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            n = write_rows(out, rows)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"cannot write {dest}: {exc.strerror or exc}") from None
    return n
