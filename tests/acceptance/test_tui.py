"""The real dashboards in a real terminal (tmux), against a live embedded cluster."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import forkserver
from helpers import REPO, WIDTH, _spawn, _stop, cli

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def _screen_until(session: str, predicate, timeout: float = 180) -> str:  # type: ignore[no-untyped-def]
    """Read the pane until ``predicate(text)`` holds. A terminal offers no event to wait on."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = _tmux("capture-pane", "-p", "-t", session)
        if predicate(text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"screen never matched; last screen:\n{text}")


def _start(session: str, args: list[str], width: int = 100, height: int = 30) -> None:
    # Forked from the test process's server onto the pane's terminal (tests/forkserver.py).
    cmd = " ".join(shlex.quote(a) for a in forkserver.terminal_command(["-m", "ganns_async", *args]))
    _tmux("new-session", "-d", "-s", session, "-x", str(width), "-y", str(height), "-c", str(REPO),
          f"{cmd}; echo EXITED $?; sleep 600")


def test_coordinator_dashboard_and_watch_in_tmux(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    common = ["--db", migrated_url, "--data", str(synth_zip)]
    coord_session, watch_session = f"coord-{uuid.uuid4().hex[:6]}", f"watch-{uuid.uuid4().hex[:6]}"
    workers = [_spawn("worker", *common, "--name", name, "--threads", "1", log=tmp_path / f"{name}.log")
               for name in ("ada-laptop", "grace-pc")]
    try:
        _start(coord_session, ["coordinator", "--local-steps", "2", *common, "--max-steps", "60", "--unit-size", "16",
                               "--feature-maps", str(WIDTH), "--eval-every", "0", "--out", str(tmp_path / "out")])
        # One frame must show both students, what they are doing, and progress towards --max-steps
        # (a frame drawn before they joined says "step 0/60" and "waiting").
        screen = _screen_until(coord_session, lambda t: "ada-laptop" in t and "grace-pc" in t
                               and re.search(r"step (?:[3-9]|\d\d)/60", t) is not None
                               and any(state in t for state in ("computing", "idle", "uploading")))
        assert "Traceback" not in screen

        _tmux("resize-window", "-t", coord_session, "-x", "80", "-y", "24")
        small = _screen_until(coord_session, lambda t: "ada-laptop" in t and max(map(len, t.splitlines())) <= 80)
        assert "step" in small and "Traceback" not in small

        _start(watch_session, ["watch", "--db", migrated_url])
        watched = _screen_until(watch_session, lambda t: "ada-laptop" in t and "grace-pc" in t)
        assert "watch" in watched.lower()
    finally:
        for session in (coord_session, watch_session):
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        for w in workers:
            _stop(w)


def test_no_tui_output_is_line_oriented(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    common = ["--db", migrated_url, "--data", str(synth_zip)]
    worker = _spawn("worker", *common, "--name", "liner", "--threads", "1", log=tmp_path / "w.log")
    try:
        r = cli("coordinator", "--local-steps", "2", *common, "--no-tui", "--max-steps", "2", "--unit-size", "8",
                "--feature-maps", str(WIDTH), "--eval-every", "0",
                "--out", str(tmp_path / "out"), timeout=240)
        assert r.returncode == 0, r.stderr
    finally:
        _stop(worker)
    lines = r.stdout.splitlines()
    steps = [line for line in lines if " ganns_async.coordinator INFO step " in line]
    assert len(steps) == 2 and all("d_loss=" in line for line in steps)
    assert "\x1b[" not in r.stdout, "no terminal escapes in log mode"
    assert any("unit" in line and "img/s" in line for line in (tmp_path / "w.log").read_text().splitlines())
