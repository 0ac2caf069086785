"""Images per second of a real class on one machine: exact mode against local steps.

For each ``--local-steps`` value: an embedded PostgreSQL, a coordinator and ``--workers``
worker processes on ``--device``, training ``--rounds`` rounds of one unit per worker.
The rate is steady state: images of rounds 2..N over the time between the end of round 1
and the end of round N, from the ``metrics`` table (stamped by PostgreSQL). The
reference is the device's own speed: one unit of ``--unit-size`` images (its gradients,
no database) computed alone, timed here in the same run.

Usage (the README's GPU figures):

    python scripts/bench_throughput.py --device cuda --local-steps 1,32
    python scripts/bench_throughput.py --device cpu --local-steps 1,8 --unit-size 32 --rounds 4
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ganns_async.data import ImageDataset, write_synthetic  # noqa: E402
from ganns_async.embedded import embedded_postgres  # noqa: E402
from ganns_async.migrate import migrate  # noqa: E402
from ganns_async.model import build_models  # noqa: E402
from ganns_async.training import compute_unit, unit_noise  # noqa: E402


def device_speed(data: Path, device: str, unit: int, reps: int = 7) -> float:
    """img/s of one unit's forward and backward passes alone (images already decoded)."""
    g, d = build_models(0)
    g.to(device)
    d.to(device)
    with ImageDataset.open(str(data)) as ds:
        images, _ = ds.load(list(range(unit)))
    noise = unit_noise(1, unit)
    times = []
    for i in range(reps + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        compute_unit(g, d, images, noise)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:  # warm-up: cuDNN picks its algorithms
            times.append(time.perf_counter() - t0)
    return unit / statistics.median(times)


async def _round_times(url: str) -> tuple[list[float], list[int]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT extract(epoch FROM created_at) AS t, images FROM metrics "
                                "WHERE run_id = (SELECT max(id) FROM runs) ORDER BY step")
        return [float(r["t"]) for r in rows], [int(r["images"]) for r in rows]
    finally:
        await conn.close()


_UNIT = re.compile(r"images in ([\d.]+)s .*weights ([\d.]+)s, compute ([\d.]+)s, upload ([\d.]+)s")
_CLOSE = re.compile(r"timings: adam\+encode ([\d.]+)s, weights write ([\d.]+)s, announce ([\d.]+)s")


def _medians(pattern: re.Pattern[str], text: str) -> list[float]:
    rows = [[float(x) for x in m.groups()] for m in pattern.finditer(text)]
    return [statistics.median(col) for col in zip(*rows)] if rows else []


def class_rate(url: str, data: Path, out: Path, h: int, staleness: int,
               args: argparse.Namespace) -> tuple[float, float, str]:
    base = [sys.executable, "-m", "ganns_async"]
    env = {**os.environ, "GANNS_DB_URL": url, "GANNS_DATA": str(data), "GANNS_NO_TUI": "1",
           "GANNS_LOG_LEVEL": "INFO"}
    out.mkdir(parents=True, exist_ok=True)
    logs = [out / f"worker-{i}.log" for i in range(args.workers)]
    workers = [subprocess.Popen(base + ["worker", "--name", f"bench-{i}", "--device", args.device,
                                        "--threads", str(args.threads)], env=env,
                                stdout=logs[i].open("w"), stderr=subprocess.STDOUT)
               for i in range(args.workers)]
    try:
        coord = subprocess.run(base + ["--log-level", "DEBUG", "coordinator", "--max-steps", str(args.rounds),
                                       "--local-steps", str(h), "--unit-size", str(args.unit_size),
                                       "--units-per-step", str(args.workers), "--max-staleness", str(staleness),
                                       "--eval-every", "0", "--checkpoint-every", str(10**6), "--out", str(out)],
                               env=env, check=True, capture_output=True, text=True)
    finally:
        for w in workers:
            w.send_signal(2)
        for w in workers:
            w.wait(60)
    times, images = asyncio.run(_round_times(url))
    rate = sum(images[1:]) / (times[-1] - times[0])
    unit = _medians(_UNIT, "".join(p.read_text() for p in logs))
    close = _medians(_CLOSE, coord.stdout + coord.stderr)
    where = ""
    if unit:
        where += f"a unit {unit[0]:.2f}s (weights {unit[1]:.2f}, compute {unit[2]:.2f}, upload {unit[3]:.2f})"
    if close:
        where += f"; closing a round: step+encode {close[0]:.2f}s, weights write {close[1]:.2f}s, " \
                 f"announce {close[2]:.2f}s"
    return rate, statistics.median(b - a for a, b in zip(times, times[1:])), where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--local-steps", default="1,32",
                    help="comma-separated H values; H/K runs H with --max-staleness K (default 0)")
    ap.add_argument("--unit-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = ap.parse_args()
    hs = [(int(h.partition("/")[0]), int(h.partition("/")[2] or 0)) for h in args.local_steps.split(",")]
    with tempfile.TemporaryDirectory(prefix="ganns-bench-") as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "faces.zip"
        write_synthetic(data, 4096)
        alone = device_speed(data, args.device, args.unit_size)
        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
        print(f"bench_throughput: {args.workers} workers on {args.device} ({name}), unit {args.unit_size} images, "
              f"{args.rounds} rounds, torch {torch.__version__}; one unit alone: {alone:.0f} img/s", flush=True)
        rows = []
        with embedded_postgres() as url:
            asyncio.run(migrate(url))
            for h, k in hs:
                rate, gap, where = class_rate(url, data, tmp_path / f"h{h}-{k}", h, k, args)
                label = f"{h}" + (f", staleness {k}" if k else "")
                rows.append((label, rate, gap))
                print(f"  H={label}: {rate:.0f} img/s, a round every {gap:.2f}s; {where}", flush=True)
    print(f"\n| local steps | img/s, {args.workers} workers | vs the device alone ({alone:.0f} img/s) | s per round |")
    print("|---|---|---|---|")
    for h, rate, gap in rows:
        print(f"| {h} | {rate:.0f} | {rate / alone:.2f} | {gap:.2f} |")


if __name__ == "__main__":
    main()
