"""User mistakes reach the user as one `error: ...` line on stderr, never a traceback: the
cases that need no PostgreSQL server (an unreachable one, a malformed URL, bad options),
through the CLI in this process (typer's CliRunner). Cases against a real server are in
tests/acceptance/test_cli_errors.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import UNREACHABLE, assert_one_line_error, cli_in_process, no_database_env, no_ganns_env

pytestmark = pytest.mark.usefixtures("keep_logging")


@pytest.fixture(autouse=True)
def _no_ganns_env(monkeypatch: pytest.MonkeyPatch) -> None:
    no_ganns_env(monkeypatch)


def cli_each(*calls: tuple[tuple[str, ...], dict]) -> list[subprocess.CompletedProcess[str]]:
    """Several cases, one after the other: ``((args), {kwargs})``."""
    return [cli_in_process(*args, **kw) for args, kw in calls]


def test_unreachable_database_worker(synth_zip: Path) -> None:
    r = cli_in_process("worker", "--db", UNREACHABLE, "--data", str(synth_zip), "--device", "cpu", "--no-tui", timeout=120)
    line = assert_one_line_error(r, "cannot reach PostgreSQL", "127.0.0.1:1", "connection refused")
    assert "secretpw" not in r.stderr + r.stdout, "the password must never be printed"
    assert "GANNS_DB_URL" in line


@pytest.mark.parametrize("args", [("db", "migrate"), ("db", "status")])
def test_unreachable_database_db_commands(args: tuple[str, ...]) -> None:
    r = cli_in_process(*args, "--db", UNREACHABLE)
    assert_one_line_error(r, "cannot reach PostgreSQL", "connection refused")
    assert "secretpw" not in r.stderr + r.stdout


def test_unreachable_database_coordinator(synth_zip: Path, tmp_path: Path) -> None:
    r = cli_in_process("coordinator", "--db", UNREACHABLE, "--data", str(synth_zip), "--out", str(tmp_path / "out"),
            "--no-tui", timeout=120)
    assert_one_line_error(r, "cannot reach PostgreSQL", "connection refused")


def test_db_url_from_environment(synth_zip: Path) -> None:
    """GANNS_DB_URL instead of --db: the same one-line error, so the variable was used."""
    by_option, by_env = cli_each(
        (("worker", "--db", UNREACHABLE, "--data", str(synth_zip), "--device", "cpu", "--no-tui"), {"timeout": 120}),
        (("worker", "--data", str(synth_zip), "--device", "cpu", "--no-tui"),
         {"env": {"GANNS_DB_URL": UNREACHABLE}, "timeout": 120}),
    )
    line = assert_one_line_error(by_env, "cannot reach PostgreSQL", "127.0.0.1:1", "connection refused")
    assert by_env.returncode == by_option.returncode
    assert line == by_option.stderr.strip()

    r = cli_in_process("db", "status", env={"GANNS_DB_URL": UNREACHABLE})
    assert_one_line_error(r, "cannot reach PostgreSQL", "connection refused")


def test_debug_shows_the_traceback(synth_zip: Path) -> None:
    r = cli_in_process("--debug", "worker", "--db", UNREACHABLE, "--data", str(synth_zip), "--device", "cpu", "--no-tui",
            timeout=120)
    assert r.returncode != 0
    assert "Traceback" in r.stderr
    assert "ConnectionRefusedError" in r.stderr  # the cause is shown too
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot reach PostgreSQL")

    r = cli_in_process("db", "migrate", "--db", UNREACHABLE, env={"GANNS_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize("url", ["mysql://x", "not a url", "mysql://u:pw@host:3306/db"])
def test_bad_database_url(url: str) -> None:
    for args in (("db", "migrate"), ("db", "status")):
        r = cli_in_process(*args, "--db", url)
        line = assert_one_line_error(r, "bad database URL", "expected postgresql://")
        assert ":pw@" not in line


def test_bad_database_url_worker_and_coordinator(synth_zip: Path, tmp_path: Path) -> None:
    worker, coordinator = cli_each(
        (("worker", "--db", "mysql://x", "--data", str(synth_zip), "--device", "cpu", "--no-tui"), {"timeout": 120}),
        (("coordinator", "--db", "not a url", "--data", str(synth_zip), "--out", str(tmp_path / "out"), "--no-tui"),
         {"timeout": 120}),
    )
    assert_one_line_error(worker, "bad database URL", "mysql://x")
    assert_one_line_error(coordinator, "bad database URL", "expected postgresql://")


def test_empty_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    no_database_env(monkeypatch)
    r = cli_in_process("db", "migrate", "--db", "")
    assert_one_line_error(r, "no database given", "GANNS_DB_URL")


@pytest.mark.parametrize("url", ["postgresql://u:p@127.0.0.1:99999/db", "postgresql://u:p@127.0.0.1:abc/db"])
def test_bad_port_in_url(url: str) -> None:
    r = cli_in_process("db", "migrate", "--db", url)
    assert_one_line_error(r, "database URL")


def test_missing_required_option(synth_zip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_database_env(monkeypatch)
    r = cli_in_process("worker", "--data", str(synth_zip))
    # Says every way to name the database.
    assert_one_line_error(r, "no database given", "--db", "GANNS_DB_URL", "DATABASE_URL", "PGHOST")

    r = cli_in_process("db", "migrate")
    assert_one_line_error(r, "no database given", "--db")

    r = cli_in_process("train-local", "--max-steps", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Missing option '--data'" in r.stderr


def test_unknown_device(synth_zip: Path) -> None:
    r = cli_in_process("worker", "--db", UNREACHABLE, "--data", str(synth_zip), "--device", "tpu", "--no-tui", timeout=120)
    assert_one_line_error(r, "unknown device", "tpu")


def test_local_step_settings_are_checked_before_anything_starts(tmp_path: Path) -> None:
    """Refused with one line naming the flag, before the database or the data are touched."""
    common = ("coordinator", "--db", UNREACHABLE, "--data", str(tmp_path / "missing.zip"), "--no-tui")
    width, momentum, outer_lr, local, narrow = cli_each(
        ((*common, "--units-per-step", "many"), {"timeout": 120}),
        ((*common, "--outer-momentum", "1.5"), {"timeout": 120}),
        (("train-local", "--data", str(tmp_path / "missing.zip"), "--max-steps", "1", "--outer-lr", "-1"),
         {"timeout": 120}),
        ((*common, "--local-steps", "0"), {"timeout": 120}),
        ((*common, "--feature-maps", "0"), {"timeout": 120}),
    )
    assert_one_line_error(width, "--units-per-step", "auto", "many")
    assert_one_line_error(momentum, "--outer-momentum", "1.5")
    assert_one_line_error(outer_lr, "--outer-lr", "-1")
    assert local.returncode != 0 and "--local-steps" in local.stderr and "Traceback" not in local.stderr
    assert narrow.returncode != 0 and "--feature-maps" in narrow.stderr and "Traceback" not in narrow.stderr


def test_train_local_on_files_that_are_not_images(tmp_path: Path) -> None:
    """A folder of files named like images that are not: one line, before any training."""
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    for k in range(1, 4):
        (folder / f"{k:06d}.jpg").write_bytes(b"<html>404 Not Found</html>")
    out = tmp_path / "out"
    r = cli_in_process("train-local", "--data", str(tmp_path), "--max-steps", "1", "--out", str(out))
    assert_one_line_error(r, "holds no image that can be decoded", "000001.jpg", "not a JPEG or PNG image")
    assert not (out / "checkpoint_latest.pth").exists()


def test_an_output_path_that_cannot_be_made_is_one_line_before_training(synth_zip: Path, tmp_path: Path) -> None:
    """--out under a file: one line naming the path, no traceback, and no training first."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = cli_in_process("train-local", "--data", str(synth_zip), "--out", str(blocker / "run"), "--max-steps", "1")
    assert_one_line_error(r, "Not a directory", str(blocker / "run"), "check the path")
    assert "step 1" not in r.stdout
    r = cli_in_process("data", "synth", "--out", str(blocker / "faces.zip"), "--count", "4")
    assert_one_line_error(r, str(blocker))
