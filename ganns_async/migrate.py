"""Schema migrations: the numbered files in ``sql/`` are the single source of the schema.

Ops may apply them with ``psql -v ON_ERROR_STOP=1 -f sql/NNN_name.sql``; each file
records its own name in ``ganns_migrations``. ``ganns-async db migrate`` applies the same
files, also records their sha256, skips applied ones, and refuses a database whose recorded
checksum differs from the file (someone changed an applied migration).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ganns_async.db import Database, connect
from ganns_async.errors import UserError

UNIQUE_VIOLATION = "23505"
_FILE_RE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    name: str  # e.g. "001_schema"
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def sql_dir() -> Path:
    """The migrations folder: packaged inside the wheel, or ``sql/`` of a source checkout."""
    packaged = resources.files("ganns_async").joinpath("sql")
    if packaged.is_dir():
        return Path(str(packaged))
    source = Path(__file__).resolve().parent.parent / "sql"
    if source.is_dir():
        return source
    raise RuntimeError("ganns-async is installed without its sql/ migrations; reinstall it")


def load_migrations(folder: Path | None = None) -> list[Migration]:
    folder = folder or sql_dir()
    found = sorted(p for p in folder.iterdir() if _FILE_RE.match(p.name))
    return [Migration(p.stem, p.read_text(encoding="utf-8")) for p in found]


@dataclass(frozen=True)
class MigrationStatus:
    name: str
    applied: bool
    checksum_ok: bool | None  # None: applied by psql, checksum not recorded yet
    applied_at: str | None


async def _applied(conn) -> dict[str, tuple[str | None, object]]:  # type: ignore[no-untyped-def]
    from ganns_async.db import queries

    if not await conn.fetchval(queries()["migrations_table_exists"]):
        return {}
    rows = await conn.fetch(queries()["applied_migrations"])
    return {r["name"]: (r["checksum"], r["applied_at"]) for r in rows}


async def status(url: str) -> list[MigrationStatus]:
    conn = await connect(url, application_name="ganns-async db")
    try:
        applied = await _applied(conn)
    finally:
        await conn.close()
    out = []
    for m in load_migrations():
        if m.name in applied:
            checksum, at = applied[m.name]
            ok = None if checksum is None else checksum == m.checksum
            out.append(MigrationStatus(m.name, True, ok, str(at)))
        else:
            out.append(MigrationStatus(m.name, False, None, None))
    known = {m.name for m in load_migrations()}
    for name, (_c, at) in sorted(applied.items()):
        if name not in known:
            out.append(MigrationStatus(name, True, None, str(at)))
    return out


async def migrate(url: str) -> list[str]:
    """Apply pending migrations in order; return the names applied."""
    from ganns_async.db import queries

    conn = await connect(url, application_name="ganns-async db")
    done: list[str] = []
    try:
        await conn.execute(queries()["lock_migrations"])
        applied = await _applied(conn)
        for m in load_migrations():
            if m.name in applied:
                recorded = applied[m.name][0]
                if recorded is not None and recorded != m.checksum:
                    raise UserError(
                        f"migration {m.name} was applied with checksum {recorded[:12]}, "
                        f"but sql/{m.name}.sql now has {m.checksum[:12]}: an applied migration "
                        "must never change; restore the file or add a new migration"
                    )
        # Files carry their own BEGIN/COMMIT (for psql), so each runs outside ours.
        for m in load_migrations():
            if m.name in applied:
                if applied[m.name][0] is None:
                    await conn.execute(queries()["record_migration_checksum"], m.name, m.checksum)
                continue
            for attempt in range(2):
                try:
                    await conn.execute(m.sql)
                    break
                except Exception as exc:
                    with contextlib.suppress(Exception):
                        await conn.execute(queries()["rollback"])
                    # Roles belong to the whole server: two databases migrated at once on a
                    # new server both create them, and the loser's CREATE ROLE fails with a
                    # unique violation. Its transaction rolled back; now the roles exist.
                    if attempt == 0 and getattr(exc, "sqlstate", None) == UNIQUE_VIOLATION:
                        continue
                    raise UserError(f"migration {m.name} failed: {exc}") from exc
            await conn.execute(queries()["record_migration_checksum"], m.name, m.checksum)
            done.append(m.name)
    finally:
        await conn.close()
    return done


async def require_migrated(db: Database) -> None:
    """Refuse an unmigrated (or newer) database with one line that names the fix."""
    known = [m.name for m in load_migrations()]
    if not await db.fetchval("migrations_table_exists"):
        raise UserError(
            "database is not migrated: run `ganns-async db migrate --db URL` "
            "(or apply sql/*.sql with psql -v ON_ERROR_STOP=1 -f)"
        )
    applied = {r["name"] for r in await db.fetch("applied_migrations")}
    missing = [n for n in known if n not in applied]
    if missing:
        raise UserError(
            f"database is missing migration(s) {', '.join(missing)}: run `ganns-async db migrate --db URL`"
        )
    unknown = sorted(applied - set(known))
    if unknown:
        raise UserError(
            f"database has migration(s) {', '.join(unknown)} that this ganns-async does not know: upgrade ganns-async"
        )
