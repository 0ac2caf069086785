"""``ganns-async demo``: the whole system on one machine, started and stopped by one command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ganns_async.embedded import embedded_postgres
from ganns_async.errors import UserError


@dataclass
class DemoOptions:
    db_url: str | None = None
    data: str | None = None
    workers: int = 2
    max_steps: int = 16
    unit_size: int = 16
    local_steps: int = 32
    feature_maps: int = 64
    out: Path = Path("ganns-out")
    synthetic_count: int = 2048
    debug: bool = False
    tui: bool = True


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> list[str]:
    """SIGTERM and SIGHUP (a closed terminal) stop the demo like Ctrl-C, so the embedded
    server is never left behind; returns the signals this platform has (Windows: no SIGHUP)."""
    names = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    for name in names:
        signal.signal(getattr(signal, name), _interrupt)
    return names


def run_demo(opts: DemoOptions) -> None:
    # Ctrl-C reaches the children too (same process group).
    stop_on_signals()
    opts.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if opts.db_url:
        _run_cluster(opts, opts.db_url, started)
        return
    _say("starting an embedded PostgreSQL ...")
    with embedded_postgres() as url:
        _run_cluster(opts, url, started, logins=True)


def _run_cluster(opts: DemoOptions, url: str, started: float, *, logins: bool = False) -> None:
    from ganns_async.migrate import migrate

    applied = asyncio.run(migrate(url))
    _say(f"database ready ({', '.join(applied) if applied else 'already migrated'})")
    # As in a class: the coordinator logs in as an instructor, each worker as a student of its
    # own (the embedded server trusts its local socket, so they need no password). With
    # --db, everything runs as the URL's user (logins are server-wide; see db add-student).
    coord_url, worker_urls = url, [url] * opts.workers
    if logins:
        coord_url, worker_urls = asyncio.run(_class_logins(url, opts.workers))
        _say(f"logins: demo_instructor (ganns_coordinator), demo_student_1..{opts.workers} (ganns_worker)")
    data = opts.data
    if data is None:
        from ganns_async.data import write_synthetic

        target = opts.out / "data" / f"synthetic_celeba_{opts.synthetic_count}.zip"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _say(f"writing {opts.synthetic_count} synthetic faces to {target} ...")
            write_synthetic(target, opts.synthetic_count)
        data = str(target)
    elif not Path(data).exists():
        raise UserError(f"dataset not found: {data}")

    # Each process gets an equal share of the cores, so they do not fight over them.
    threads = max(1, (os.cpu_count() or 2) // max(1, opts.workers))
    base = [sys.executable, "-m", "ganns_async"] + (["--debug"] if opts.debug else [])
    env = {**os.environ, "GANNS_DB_URL": coord_url, "GANNS_DATA": data, "GANNS_NO_TUI": "1"}
    # About eight sample grids and SWD points over the run, whatever its length: evaluating
    # 512 images costs the coordinator seconds of CPU that the workers would rather have.
    every = str(max(1, opts.max_steps // 8))
    # One unit per worker each round, fixed: the workers start just after the coordinator,
    # so "auto" could size the first round before they are online.
    coordinator_cmd = base + ["coordinator", "--max-steps", str(opts.max_steps), "--out", str(opts.out),
                              "--unit-size", str(opts.unit_size), "--local-steps", str(opts.local_steps),
                              "--units-per-step", str(opts.workers), "--feature-maps", str(opts.feature_maps),
                              "--checkpoint-every", every, "--eval-every", every]
    # On a terminal the coordinator draws its dashboard, so the workers write to log files.
    dashboard = opts.tui and sys.stdout.isatty()
    coord_env = {k: v for k, v in env.items() if k != "GANNS_NO_TUI"} if dashboard else env
    logs = opts.out / "logs"
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        per_round = opts.workers * opts.unit_size * opts.local_steps
        _say(f"starting the coordinator and {opts.workers} worker(s); training {opts.max_steps} rounds of "
             f"{per_round} images ({opts.local_steps} local steps of {opts.unit_size} per worker)")
        if dashboard:
            logs.mkdir(parents=True, exist_ok=True)
            _say(f"worker logs: {logs.resolve()}")
        coord = subprocess.Popen(coordinator_cmd, env=coord_env)
        procs.append(("coordinator", coord))
        for i in range(opts.workers):
            name = f"demo_student_{i + 1}" if logins else f"demo-worker-{i + 1}"
            cmd = base + ["worker", "--name", name, "--threads", str(threads)]
            out = open(logs / f"worker-{i + 1}.log", "wb") if dashboard else None  # noqa: SIM115
            worker_env = {**env, "GANNS_DB_URL": worker_urls[i]}
            procs.append((f"worker {i + 1}", subprocess.Popen(cmd, env=worker_env, stdout=out, stderr=out)))
        while coord.poll() is None:
            for name, proc in procs[1:]:
                if proc.poll() is not None and proc.returncode != 0:
                    raise UserError(f"{name} exited with code {proc.returncode}; see its messages above")
            time.sleep(0.5)  # watching child processes, not the database
        if coord.returncode != 0:
            raise UserError(f"the coordinator exited with code {coord.returncode}; see its messages above")
    except KeyboardInterrupt:
        _say("interrupted; stopping every process ...")
        _stop_all(procs)
        raise
    finally:
        _stop_all(procs)
    swd = asyncio.run(_swd_curve(url))
    ckpt = opts.out / "checkpoint_latest.pth"
    samples = sorted((opts.out / "samples").glob("step_*.png"))
    _say(f"done in {time.monotonic() - started:.0f}s")
    _say(f"checkpoint:   {ckpt.resolve()}")
    if (opts.out / "generator" / "config.json").exists():
        _say(f"model:        {(opts.out / 'generator').resolve()} (Generator.from_pretrained(...) loads it)")
    if samples:
        _say(f"sample grids: {samples[-1].parent.resolve()} (latest: {samples[-1].name})")
    if (opts.out / "metrics.png").exists():
        _say(f"curves:       {(opts.out / 'metrics.png').resolve()}")
    if len(swd) >= 2:
        (s0, v0), (s1, v1) = swd[0], swd[-1]
        _say(f"quality:      SWD x1e3 {v0:.1f} at step {s0} -> {v1:.1f} at step {s1} (lower is better)")


async def _class_logins(url: str, workers: int) -> tuple[str, list[str]]:
    from ganns_async.logins import add_login

    coordinator = await add_login(url, "demo_instructor", "instructor", generate_password=False)
    students = [await add_login(url, f"demo_student_{i + 1}", "student", generate_password=False)
                for i in range(workers)]
    return coordinator, students


async def _swd_curve(url: str) -> list[tuple[int, float]]:
    from ganns_async.db import Database

    db = await Database.open(url, max_size=1)
    try:
        run = await db.fetchrow("latest_run")
        if run is None:
            return []
        return [(r["step"], r["swd"]) for r in await db.fetch("run_metrics", run["id"]) if r["swd"] is not None]
    finally:
        await db.close()


def _stop_all(procs: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    """SIGTERM (each process stops as on Ctrl-C: workers give their unit back), then SIGKILL
    whatever is still running after 15 s. Not SIGINT: a demo started in the background
    (``ganns-async demo &``) starts its children with SIGINT ignored. On Windows terminate()
    ends the process at once (units come back by lease)."""
    for _name, proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    deadline = time.monotonic() + 15
    for _name, proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
        if proc.poll() is None:
            proc.kill()
            proc.wait()
