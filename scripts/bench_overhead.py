"""What does distribution cost? train-local versus a coordinator and one worker.

Both train the same schedule (same seed, unit size, units per step) on the same machine,
one after the other in this one run:

* ``train-local``: the reference trainer, in this process, no PostgreSQL;
* distributed: an embedded PostgreSQL, a coordinator and one worker as subprocesses, in
  the exact mode (``--local-steps 1``), for ``--max-staleness 0`` and ``1``.

Figures are steady-state images per second: the first step (imports, warm-up, first
weights fetch) is excluded, so the rate is images of steps 2..N over the time between the
end of step 1 and the end of step N. For distributed runs those times come from the
``metrics`` table (one row per step, stamped by PostgreSQL).

Usage: python scripts/bench_overhead.py [--steps 12] [--unit-size 64] [--units-per-step 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import torch

from ganns_async.data import write_synthetic
from ganns_async.embedded import embedded_postgres
from ganns_async.local import LocalOptions, train_local
from ganns_async.migrate import migrate
from ganns_async.training import TrainConfig


def local_rate(data: Path, out: Path, args: argparse.Namespace) -> float:
    cfg = TrainConfig(seed=0, unit_size=args.unit_size, units_per_step=args.units_per_step, max_staleness=0,
                      grad_dtype="fp32")
    result = train_local(LocalOptions(data=str(data), max_steps=args.steps, out=out, config=cfg,
                                      checkpoint_every=10**9, threads=args.threads))
    per_step = args.unit_size * args.units_per_step
    return per_step * (args.steps - 1) / (result.step_ends[-1] - result.step_ends[0])


async def _step_times(url: str) -> list[float]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT extract(epoch FROM created_at) AS t, images FROM metrics "
                                "WHERE run_id = (SELECT max(id) FROM runs) ORDER BY step")
        return [float(r["t"]) for r in rows]
    finally:
        await conn.close()


_TIMINGS = re.compile(r"step (\d+) timings: adam\+encode ([\d.]+)s, weights write ([\d.]+)s, announce ([\d.]+)s")


def distributed_rate(url: str, data: Path, out: Path, staleness: int, args: argparse.Namespace) -> tuple[float, str]:
    base = [sys.executable, "-m", "ganns_async"]
    env = {**os.environ, "GANNS_DB_URL": url, "GANNS_DATA": str(data), "GANNS_NO_TUI": "1",
           "GANNS_LOG_LEVEL": "WARNING"}
    worker = subprocess.Popen(base + ["worker", "--name", "bench", "--threads", str(args.threads)], env=env)
    try:
        # DEBUG: the coordinator logs where each step's closing time goes.
        coord = subprocess.run(base + ["--log-level", "DEBUG", "coordinator", "--max-steps", str(args.steps),
                                       "--max-staleness", str(staleness), "--unit-size", str(args.unit_size),
                                       "--local-steps", "1",
                                       "--units-per-step", str(args.units_per_step), "--eval-every", "0",
                                       "--checkpoint-every", str(10**6), "--out", str(out)],
                               env=env, check=True, capture_output=True, text=True)
    finally:
        worker.send_signal(2)
        worker.wait(60)
    times = asyncio.run(_step_times(url))
    per_step = args.unit_size * args.units_per_step
    rate = per_step * (len(times) - 1) / (times[-1] - times[0])
    found = [tuple(float(x) for x in m.groups()[1:]) for m in _TIMINGS.finditer(coord.stderr + coord.stdout)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    where = ""
    if found:
        med = [statistics.median(col) for col in zip(*found)]
        where = (f"step {statistics.median(gaps):.2f}s: closing it takes adam+encode {med[0]:.3f}s, "
                 f"weights write {med[1]:.3f}s, announce {med[2]:.3f}s (medians)")
    return rate, where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--unit-size", type=int, default=64)
    ap.add_argument("--units-per-step", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ganns-bench-") as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "faces.zip"
        write_synthetic(data, 1024)
        print(f"bench_overhead: {args.steps} steps x {args.units_per_step} units x {args.unit_size} images, "
              f"{args.threads} torch threads, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}", flush=True)
        rates: dict[str, float] = {"train-local": local_rate(data, tmp_path / "local", args)}
        with embedded_postgres() as url:
            asyncio.run(migrate(url))
            wheres: dict[str, str] = {}
            for k in (0, 1):
                name = f"distributed, 1 worker, staleness {k}"
                rates[name], wheres[name] = distributed_rate(url, data, tmp_path / f"d{k}", k, args)
    ref = rates["train-local"]
    print(f"{'mode':<38} {'img/s':>8} {'vs local':>9}")
    for name, rate in rates.items():
        print(f"{name:<38} {rate:>8.1f} {rate / ref:>8.2f}x")
    for name, where in wheres.items():
        if where:
            print(f"{name}: {where}")


if __name__ == "__main__":
    main()
