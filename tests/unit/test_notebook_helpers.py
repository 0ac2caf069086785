"""ganns_async.notebook: where the class URL comes from, the name, and the cell's report."""

from __future__ import annotations

import io
import sys
import types
from typing import Any

import pytest

from ganns_async import notebook
from ganns_async.errors import UserError
from ganns_async.states import WorkerState
from ganns_async.worker import WorkerStatus


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GANNS_DB_URL", "DATABASE_URL", "GANNS_NAME"):
        monkeypatch.delenv(var, raising=False)


def _colab(monkeypatch: pytest.MonkeyPatch, get: Any) -> None:
    """Colab's google.colab.userdata, as a notebook there sees it."""
    google = types.ModuleType("google")
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=get)  # type: ignore[attr-defined]
    google.colab = colab  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)


def test_url_from_the_environment_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://b@h/db")
    assert notebook.class_database_url(prompt=False) == "postgresql://b@h/db"
    monkeypatch.setenv("GANNS_DB_URL", " postgresql://a@h/db \n")
    assert notebook.class_database_url(prompt=False) == "postgresql://a@h/db"


def test_the_notebook_secret_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GANNS_DB_URL", "postgresql://env@h/db")
    _colab(monkeypatch, lambda name: {"GANNS_DB_URL": "postgresql://secret@h/db"}[name])
    assert notebook.class_database_url(prompt=False) == "postgresql://secret@h/db"


def test_a_secret_the_notebook_may_not_read_says_how_to_allow_it(monkeypatch: pytest.MonkeyPatch) -> None:
    class NotebookAccessError(Exception):
        pass

    def get(name: str) -> str:
        raise NotebookAccessError(name)

    _colab(monkeypatch, get)
    with pytest.raises(UserError, match="Notebook access"):
        notebook.class_database_url(prompt=False)


def test_a_missing_secret_falls_back_then_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    class SecretNotFoundError(Exception):
        pass

    def get(name: str) -> str:
        raise SecretNotFoundError(name)

    _colab(monkeypatch, get)
    with pytest.raises(UserError, match="notebook secret GANNS_DB_URL"):
        notebook.class_database_url(prompt=False)
    monkeypatch.setattr(notebook.getpass, "getpass", lambda prompt: "postgresql://typed@h/db")
    assert notebook.class_database_url() == "postgresql://typed@h/db"


def test_name_from_env_or_answer_or_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("builtins.input", lambda prompt: "  ada  ")
    assert notebook.ask_name() == "ada"
    monkeypatch.setattr("builtins.input", lambda prompt: "")
    assert notebook.ask_name("fallback") == "fallback"
    monkeypatch.setenv("GANNS_NAME", "grace")
    assert notebook.ask_name() == "grace"


def test_cell_report_says_each_change_once() -> None:
    out = io.StringIO()
    report = notebook.CellReport(out, clock=lambda: 0.0)
    s = WorkerStatus(name="ada", connection="connected")
    report(s)
    report(s)  # nothing new: nothing said
    s.state, s.unit_step = WorkerState.COMPUTING, 3
    report(s)
    s.units_done, s.images_done, s.images_per_s, s.state = 1, 1024, 33.4, WorkerState.WAITING
    report(s)
    s.connection = "reconnecting"
    report(s)
    lines = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == [
        "waiting for work (the instructor's coordinator publishes it)",
        "computing a unit of round 3",
        "unit done: 1 unit, 1,024 images so far, 33 images/s",
        "waiting for work (the instructor's coordinator publishes it)",
        "database: reconnecting",
    ]
