"""Strings typed by students (names, devices, event text) reach the instructor's terminal
only as plain, printable text: no escape sequences, no Rich markup, no forged lines."""

from __future__ import annotations

from ganns_async.dashboard import render_worker
from ganns_async.terminal import printable
from ganns_async.worker import WorkerStatus, worker_snapshot
from helpers import HOSTILE, _render


def test_printable_replaces_every_control_and_keeps_letters() -> None:
    assert printable("Zoë 李 — ok") == "Zoë 李 — ok"
    for s in HOSTILE:
        out = printable(s)
        assert out.isprintable() and "\x1b" not in out and "\n" not in out and "\u202e" not in out
    assert printable("x" * 500, 10) == "x" * 10 + "…"
    assert printable(None) == "None"


def test_the_worker_view_survives_its_own_name() -> None:
    for s in HOSTILE:
        snap = worker_snapshot(WorkerStatus(name=s, device=s, message=s))
        assert snap.name.isprintable() and snap.message.isprintable()
        assert "\x1b]52" not in _render(render_worker(snap, 100, 24))
