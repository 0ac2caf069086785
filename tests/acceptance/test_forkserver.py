"""The fork server the acceptance tests start their processes with (tests/forkserver.py)
must be indistinguishable from ``subprocess``: a process of its own, its arguments, working
directory, environment and streams, signals, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import forkserver
from helpers import REPO, _fetch, _wait_for_worker_state

PROBE = REPO / "tests" / "acceptance" / "forkserver_probe.py"


def _first_line(path: Path, proc: forkserver.ForkedProcess | subprocess.Popen[bytes]) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while not path.read_text().endswith("\n"):
        assert proc.poll() is None and time.monotonic() < deadline, path.read_text()
        time.sleep(0.02)
    return json.loads(path.read_text().splitlines()[0])


def test_a_forked_process_is_its_own_with_what_it_was_given(tmp_path: Path) -> None:
    log = tmp_path / "probe.log"
    with open(log, "wb") as fh:
        proc = forkserver.popen([str(PROBE), "wait"], stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env={**os.environ, "GANNS_PROBE": "yes"})
    assert isinstance(proc, forkserver.ForkedProcess)
    try:
        seen = _first_line(log, proc)
        assert seen == {"pid": proc.pid, "cwd": str(tmp_path), "argv": [str(PROBE), "wait"], "probe": "yes",
                        "torch": True}  # torch came with the server, imported once
        assert proc.pid != os.getpid() and proc.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.2)
        proc.send_signal(signal.SIGINT)  # Python's own Ctrl-C handling, as in any process
        assert proc.wait(30) == 3
    finally:
        proc.kill()
    assert "to stderr" in log.read_text()


def test_exit_codes_and_kills_come_back(tmp_path: Path) -> None:
    assert forkserver.run([str(PROBE), "exit"], cwd=tmp_path, timeout=60).returncode == 7
    log = tmp_path / "probe.log"
    with open(log, "wb") as fh:
        proc = forkserver.popen([str(PROBE), "wait"], stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path)
    _first_line(log, proc)
    proc.kill()
    assert proc.wait(30) == -signal.SIGKILL
    proc.kill()  # a process already gone: nothing to do, as with subprocess


def test_the_cli_runs_and_its_output_is_captured() -> None:
    r = forkserver.run(["-m", "ganns_async", "db", "status", "--db", "postgresql://nobody@/x?host=/nonexistent"],
                       cwd=REPO, timeout=60)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert forkserver.run(["-m", "ganns_async", "--help"], cwd=REPO, timeout=60).stdout.startswith("Usage: ")


def test_an_environment_read_at_import_time_gets_a_fresh_interpreter(tmp_path: Path) -> None:
    """OMP_NUM_THREADS (torch reads it when imported): the server's imports would not see a
    new value, so such a request execs a fresh interpreter instead."""
    other = "2" if os.environ.get("OMP_NUM_THREADS") == "1" else "1"
    with open(tmp_path / "log", "wb") as fh:
        proc = forkserver.popen([str(PROBE), "exit"], stdout=fh, env={**os.environ, "OMP_NUM_THREADS": other})
    assert isinstance(proc, subprocess.Popen) and proc.wait(60) == 7
    assert json.loads((tmp_path / "log").read_text().splitlines()[0])["torch"] is False


def test_a_new_hf_home_is_seen_by_a_forked_child(tmp_path: Path) -> None:
    """HF_HOME is read by huggingface_hub when it is imported: a forked child imports it (and
    ganns_async, which holds it) again, and sees the cache folder a new interpreter would."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "GANNS_PROBE_HUB": "1"}
    env.pop("HF_HUB_CACHE", None)
    with open(tmp_path / "forked", "wb") as fh:
        forked = forkserver.popen([str(PROBE), "exit"], stdout=fh, env=env)
    assert isinstance(forked, forkserver.ForkedProcess) and forked.wait(60) == 7
    fresh = subprocess.run([sys.executable, str(PROBE), "exit"], capture_output=True, text=True, env=env, timeout=120)
    got, want = (json.loads(text.splitlines()[0]) for text in ((tmp_path / "forked").read_text(), fresh.stdout))
    assert got["torch"] is True and want["torch"] is False  # forked from the server, and a new interpreter
    assert got["hf_hub_cache"] == want["hf_hub_cache"] == str(tmp_path / "hf" / "hub")
    assert got["same_hub"] is True and want["same_hub"] is True


def test_a_terminal_command_forks_onto_the_callers_streams_and_passes_signals_on(
        migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    """What a tmux pane runs (forkserver.terminal_command): the child writes to the client's
    own streams, its exit status is the client's, and a signal to the client reaches it."""
    helped = forkserver.terminal_command(["-m", "ganns_async", "--help"])
    assert helped[1:3] == [str(REPO / "tests" / "forkserver.py"), "--client"]
    r = subprocess.run(helped, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0 and r.stdout.startswith("Usage: ")
    bad = subprocess.run(forkserver.terminal_command(["-m", "ganns_async", "db", "status", "--db",
                                                      "postgresql://nobody@/x?host=/nonexistent"]),
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode not in (0, None) and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1

    with open(tmp_path / "worker.log", "wb") as fh:
        client = subprocess.Popen(forkserver.terminal_command(
            ["-m", "ganns_async", "worker", "--db", migrated_url, "--data", str(synth_zip), "--name", "paned",
             "--threads", "1", "--no-tui"]), stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        asyncio.run(_wait_for_worker_state(migrated_url, "paned", "waiting"))
        client.send_signal(signal.SIGINT)  # Ctrl-C in the pane
        assert client.wait(60) == 0, (tmp_path / "worker.log").read_text()
    finally:
        if client.poll() is None:
            client.kill()
    state = asyncio.run(_fetch(migrated_url, "SELECT state FROM workers WHERE name = 'paned'"))
    assert [r["state"] for r in state] == ["offline"], "the worker itself got the Ctrl-C and said goodbye"
