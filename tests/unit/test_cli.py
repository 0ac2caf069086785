"""The command line's own conventions: --version, shell completion, help that reads well.

Typer's CliRunner runs the CLI in this process (no subprocess); what start-up imports is
checked in tests/acceptance/test_cli_startup.py, where a fresh interpreter can tell.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import tomllib

import pytest
from typer.testing import CliRunner

from ganns_async import __version__, cli
from ganns_async.cli import app
from helpers import REPO


pytestmark = pytest.mark.usefixtures("keep_logging")


def invoke(*args: str, **kw: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args), prog_name="ganns-async", **kw)


def test_version_prints_the_installed_version() -> None:
    r = invoke("--version")
    assert r.exit_code == 0, r.output
    assert r.stdout == f"ganns-async {importlib.metadata.version('ganns-async')}\n"


def test_version_is_eager() -> None:
    """--version answers before a command's own options are checked (it needs no --db)."""
    r = invoke("--version", "worker")
    assert r.exit_code == 0 and r.stdout.startswith("ganns-async "), r.output


def test_version_without_package_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """A source checkout on PYTHONPATH, never installed: the package's __version__."""
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout == f"ganns-async {__version__}\n", r.output


def test_dunder_version_matches_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert __version__ == project["version"]


def test_show_completion_prints_the_script_for_this_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """The script the shell sources: it calls ganns-async back with _GANNS_ASYNC_COMPLETE.

    Typer finds the user's shell among this process's ancestors (shellingham); a test run
    may have none (CI started without a shell), so the test says it was started from bash.
    """
    import typer.completion

    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    r = invoke("--show-completion")
    assert r.exit_code == 0, r.output
    assert "_GANNS_ASYNC_COMPLETE=complete_bash" in r.stdout and "complete " in r.stdout


def test_hub_library_messages_are_printed_once(capsys: pytest.CaptureFixture[str]) -> None:
    """huggingface_hub installs a stderr handler of its own and also lets records reach the
    root logger; the CLI keeps only its own, so a download retry is one line, not two (the
    second one across the dashboard)."""
    import huggingface_hub.utils.logging  # noqa: F401 - what a download imports

    hub_logger = logging.getLogger("huggingface_hub")
    saved = list(hub_logger.handlers), hub_logger.propagate
    try:
        if not hub_logger.handlers:  # as huggingface_hub's import does (once per process)
            hub_logger.addHandler(logging.StreamHandler(sys.stderr))
        cli._setup_logging("INFO")
        assert hub_logger.handlers == [] and hub_logger.propagate
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        out = capsys.readouterr()
        assert (out.out + out.err).count("Retrying in 1s") == 1
        assert "huggingface_hub.utils._http WARNING Retrying in 1s" in out.out
    finally:
        hub_logger.handlers[:] = saved[0]
        hub_logger.propagate = saved[1]
