"""Benchmark database growth under the blob workload, and what keeps it flat.

Each simulated optimizer step inserts one 25 MB weights row (logged table,
``payload`` with STORAGE EXTERNAL, as in sql/001_schema.sql) and U gradient
rows of ~24 MB (UNLOGGED table), reads the gradients back, deletes them and
deletes weights versions older than the newest 3 (``version < step - 2``).
Deleted TOAST chunks only become reusable after a VACUUM, and with default
server settings autovacuum visits a database at most once a minute
(``autovacuum_naptime``), so without help the files grow by ~75 MB a step.

Each mechanism runs in its own scratch database of one embedded PostgreSQL
with default settings, steps as fast as it can, and we record
``pg_database_size`` every N steps (and its peak, sampled every step):

  a  baseline       DELETE only, default autovacuum
  b  autovac-params DELETE, plus per-table autovacuum settings (also toast.*)
  c  vacuum-each    DELETE, then ``VACUUM`` both tables after every step
  d  vacuum-5       DELETE, then ``VACUUM`` both tables every 5 steps
  e  ring-truncate  a ring of R tables each for weights and gradients;
                    the slot about to be reused is emptied with TRUNCATE

"live" is the payload bytes still present at the end: the ring keeps the
gradients of the last R-1 steps, the DELETE mechanisms keep none.  "maint" is
the median (and max) time of one VACUUM or TRUNCATE statement.

    python scripts/bench_db_growth.py [--steps 120] [--every 20] [--only ace]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ganns_async.embedded import embedded_postgres  # noqa: E402

# platformdirs (under pgserver) warns when XDG_RUNTIME_DIR is unset; the fallback is fine.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")

MB = 1e6
KEEP_BEHIND = 2  # weights versions < step - KEEP_BEHIND are deleted: 3 versions stay
MECHANISMS = {
    "a": "baseline",
    "b": "autovac-params",
    "c": "vacuum-each",
    "d": "vacuum-5",
    "e": "ring-truncate",
}
AUTOVAC_PARAMS = ", ".join(
    f"{prefix}{name} = {value}"
    for prefix in ("", "toast.")
    for name, value in (
        ("autovacuum_vacuum_scale_factor", 0),
        ("autovacuum_vacuum_threshold", 1),
        ("autovacuum_vacuum_cost_delay", 0),
    )
)


@dataclass
class Result:
    name: str
    sizes: dict[int, float] = field(default_factory=dict)  # step -> MB
    peak: float = 0.0
    live: float = 0.0
    step_times: list[float] = field(default_factory=list)
    maint_times: list[float] = field(default_factory=list)
    autovacuums: int = 0


class Blob:
    """Incompressible bytes generated once; each use stamps a fresh counter into the
    first 8 bytes, in place, so every row differs without copying 25 MB per insert."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(os.urandom(size))
        self.n = 0

    def next(self) -> bytearray:
        self.n += 1
        self.buf[:8] = self.n.to_bytes(8, "little")
        return self.buf


def table_names(mech: str, ring: int) -> tuple[list[str], list[str]]:
    if mech == "e":
        return [f"weights_{i}" for i in range(ring)], [f"gradients_{i}" for i in range(ring)]
    return ["weights"], ["gradients"]


async def create_tables(conn: asyncpg.Connection, mech: str, ring: int) -> None:
    weights, gradients = table_names(mech, ring)
    for name in weights:
        await conn.execute(f"CREATE TABLE {name} (version integer PRIMARY KEY, payload bytea NOT NULL)")
    for name in gradients:
        await conn.execute(
            f"CREATE UNLOGGED TABLE {name} (id bigserial PRIMARY KEY, step integer NOT NULL, payload bytea NOT NULL)"
        )
    for name in weights + gradients:
        # As in the schema: blobs are zstd already, so PostgreSQL must not try to compress.
        await conn.execute(f"ALTER TABLE {name} ALTER COLUMN payload SET STORAGE EXTERNAL")
        if mech == "b":
            await conn.execute(f"ALTER TABLE {name} SET ({AUTOVAC_PARAMS})")


async def timed(conn: asyncpg.Connection, sql: str, into: list[float]) -> None:
    t0 = time.perf_counter()
    await conn.execute(sql)
    into.append(time.perf_counter() - t0)


async def run_step(
    conn: asyncpg.Connection, maint: asyncpg.Connection, mech: str, step: int,
    args: argparse.Namespace, wblob: Blob, gblob: Blob, res: Result,
) -> None:
    ring = mech == "e"
    wt, gt = (f"weights_{step % args.ring}", f"gradients_{step % args.ring}") if ring else ("weights", "gradients")
    await conn.execute(f"INSERT INTO {wt} (version, payload) VALUES ($1, $2)", step, wblob.next())
    for _ in range(args.units):
        await conn.execute(f"INSERT INTO {gt} (step, payload) VALUES ($1, $2)", step, gblob.next())
    rows = await conn.fetch(f"SELECT payload FROM {gt} WHERE step = $1", step)
    assert len(rows) == args.units and all(len(r["payload"]) == int(args.grad_mb * MB) for r in rows)
    del rows

    if ring:
        # The slot about to be reused holds step - (R-1): TRUNCATE swaps in a fresh empty
        # file at once, no VACUUM needed.  One statement per table, timed separately.
        nxt = (step + 1) % args.ring
        for table in (f"weights_{nxt}", f"gradients_{nxt}"):
            await timed(maint, f"TRUNCATE {table}", res.maint_times)
        return

    await conn.execute("DELETE FROM gradients WHERE step = $1", step)
    await conn.execute("DELETE FROM weights WHERE version < $1", step - KEEP_BEHIND)
    if mech == "c" or (mech == "d" and step % 5 == 4):
        # Own connection, one statement each: VACUUM cannot run in a transaction block.
        # Vacuuming a table vacuums its TOAST table too.
        for table in ("weights", "gradients"):
            await timed(maint, f"VACUUM {table}", res.maint_times)


async def run_mechanism(url: str, mech: str, args: argparse.Namespace, wblob: Blob, gblob: Blob) -> Result:
    db = f"bench_growth_{mech}"
    admin = await asyncpg.connect(url, database="postgres")
    await admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {db}")
    conn = await asyncpg.connect(url, database=db)
    maint = await asyncpg.connect(url, database=db)
    res = Result(MECHANISMS[mech])
    try:
        await create_tables(conn, mech, args.ring)
        for step in range(args.steps):
            t0 = time.perf_counter()
            await run_step(conn, maint, mech, step, args, wblob, gblob, res)
            res.step_times.append(time.perf_counter() - t0)
            size = await conn.fetchval("SELECT pg_database_size(current_database())") / MB
            res.peak = max(res.peak, size)
            done = step + 1
            if done % args.every == 0 or done == args.steps:
                res.sizes[done] = size
                print(f"  {res.name:<15} step {done:>4}: {size:8.0f} MB", file=sys.stderr, flush=True)
        weights, gradients = table_names(mech, args.ring)
        live = " UNION ALL ".join(f"SELECT octet_length(payload) AS n FROM {t}" for t in weights + gradients)
        res.live = await conn.fetchval(f"SELECT coalesce(sum(n), 0) FROM ({live}) x") / MB
        # Autovacuum runs on the tables or their TOAST tables (stats may lag a little).
        res.autovacuums = await conn.fetchval(
            """SELECT coalesce(sum(s.autovacuum_count), 0) FROM pg_class c
               JOIN pg_stat_all_tables s ON s.relid IN (c.oid, c.reltoastrelid)
               WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'"""
        )
    finally:
        await conn.close()
        await maint.close()
        # Drop it so the next mechanism starts clean and autovacuum has one database less to visit.
        await admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        await admin.close()
    return res


def print_table(results: list[Result], checkpoints: list[int]) -> None:
    head = ["mechanism"] + [f"@{c}" for c in checkpoints] + ["peak", "live", "s/step", "maint med/max ms", "autovac"]
    rows = []
    for r in results:
        maint = (
            f"{statistics.median(r.maint_times) * 1e3:.0f}/{max(r.maint_times) * 1e3:.0f} (n={len(r.maint_times)})"
            if r.maint_times else "-"
        )
        rows.append(
            [r.name] + [f"{r.sizes[c]:.0f}" for c in checkpoints]
            + [f"{r.peak:.0f}", f"{r.live:.0f}", f"{statistics.mean(r.step_times):.3f}", maint, str(r.autovacuums)]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    for i, line in enumerate([head] + rows):
        print("  ".join(x.ljust(w) if j == 0 else x.rjust(w) for j, (x, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


async def main_async(args: argparse.Namespace) -> None:
    wblob, gblob = Blob(int(args.weights_mb * MB)), Blob(int(args.grad_mb * MB))
    with embedded_postgres() as url:
        conn = await asyncpg.connect(url)
        version = await conn.fetchval("SHOW server_version")
        settings = await conn.fetch(
            "SELECT name, current_setting(name) AS value FROM pg_settings WHERE name IN "
            "('autovacuum_naptime', 'autovacuum_vacuum_cost_delay', 'autovacuum_vacuum_threshold', "
            "'autovacuum_vacuum_scale_factor', 'shared_buffers')"
        )
        await conn.close()
        print(f"PostgreSQL {version}, default settings: "
              + ", ".join(f"{s['name']}={s['value']}" for s in settings))
        print(f"steps={args.steps}  weights={args.weights_mb:g} MB  gradients={args.units} x {args.grad_mb:g} MB"
              f"  ring={args.ring}  sizes: pg_database_size in MB\n")
        results = []
        for mech in args.only:
            print(f"running {mech}) {MECHANISMS[mech]}", file=sys.stderr, flush=True)
            results.append(await run_mechanism(url, mech, args, wblob, gblob))
    checkpoints = sorted(results[0].sizes)
    print_table(results, checkpoints)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per mechanism (default 120)")
    parser.add_argument("--every", type=int, default=20, help="report the size every N steps (default 20)")
    parser.add_argument("--units", type=int, default=2, help="gradient rows per step (default 2)")
    parser.add_argument("--weights-mb", type=float, default=25, help="weights blob size in MB (default 25)")
    parser.add_argument("--grad-mb", type=float, default=24, help="gradient blob size in MB (default 24)")
    parser.add_argument("--ring", type=int, default=4, help="ring size for mechanism e (default 4)")
    parser.add_argument("--only", default="abcde", help="mechanisms to run, e.g. 'ace' (default abcde)")
    args = parser.parse_args()
    if not set(args.only) <= set(MECHANISMS) or args.ring < 2:
        parser.error(f"--only takes letters from {''.join(MECHANISMS)}; --ring must be >= 2")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
