"""Strings typed by students (names, devices, event text) reach the instructor's terminal
only as plain, printable text: no escape sequences, no Rich markup, no forged lines."""

from __future__ import annotations

import asyncio

import asyncpg
from rich.console import Console

from ganns_async.cluster_state import plain_line, read_snapshot
from ganns_async.dashboard import render_cluster, render_worker
from ganns_async.db import Database
from ganns_async.terminal import printable
from ganns_async.worker import WorkerStatus, worker_snapshot

HOSTILE = [
    "\x1b]52;c;cm0gLXJmIH4=\x07",  # OSC 52: write the clipboard
    "\x1b[2J\x1b[H",  # clear the screen
    "[/x]",  # a Rich closing tag that matches nothing: MarkupError
    "[bold red]fake[/]",
    "line\nstep 99 applied",  # a forged log line
    "\u202egnp.exe",  # right-to-left override
    "\x9b31m",  # C1 CSI
]


def test_printable_replaces_every_control_and_keeps_letters() -> None:
    assert printable("Zoë 李 — ok") == "Zoë 李 — ok"
    for s in HOSTILE:
        out = printable(s)
        assert out.isprintable() and "\x1b" not in out and "\n" not in out and "\u202e" not in out
    assert printable("x" * 500, 10) == "x" * 10 + "…"
    assert printable(None) == "None"


def _render(renderable: object) -> str:
    console = Console(record=True, width=120, color_system="truecolor", force_terminal=True)
    console.print(renderable)
    return console.export_text(clear=False)


def test_hostile_rows_in_the_database_render_as_plain_text(migrated_url: str) -> None:
    async def scenario() -> object:
        conn = await asyncpg.connect(migrated_url)
        try:
            run_id = await conn.fetchval(
                "INSERT INTO runs (config, dataset_fingerprint, dataset_size) "
                "VALUES ('{\"local_steps\": 4, \"units_per_step\": 0}', 'x', 10) RETURNING id")
            # Names are CHECKed since sql/003_roles.sql, but rows written before it are not
            # (NOT VALID): the dashboards must survive those too.
            await conn.execute("ALTER TABLE workers DROP CONSTRAINT workers_name_printable")
            for i, name in enumerate(HOSTILE):
                await conn.execute("INSERT INTO workers (name, hostname, device, run_id) VALUES ($1, 'h', $2, $3)",
                                   name, HOSTILE[-1 - i], run_id)
                await conn.execute("INSERT INTO events (run_id, kind, message) VALUES ($1, 'join', $2)",
                                   run_id, f"{name} joined")
        finally:
            await conn.close()
        db = await Database.open(migrated_url, max_size=1)
        try:
            return await read_snapshot(db, title="watch", run_id=run_id, leaderboard=True)
        finally:
            await db.close()

    snap = asyncio.run(scenario())
    text = _render(render_cluster(snap, 120, 40))  # type: ignore[arg-type]
    names = [w.name for w in snap.workers]  # type: ignore[attr-defined]
    assert len(names) == len(HOSTILE)
    for value in names + [e.message for e in snap.events] + [plain_line(snap)]:  # type: ignore[attr-defined]
        assert value.isprintable(), repr(value)
    assert "\x1b]52" not in text and "\u202e" not in text
    assert "[/x]" in text  # shown as typed, not swallowed or fatal


def test_the_worker_view_survives_its_own_name() -> None:
    for s in HOSTILE:
        snap = worker_snapshot(WorkerStatus(name=s, device=s, message=s))
        assert snap.name.isprintable() and snap.message.isprintable()
        assert "\x1b]52" not in _render(render_worker(snap, 100, 24))
