"""The notebooks, executed in a real Jupyter kernel (nbclient + ipykernel) as a student runs them.

``worker.ipynb`` runs end to end against the test PostgreSQL and a fake Hub on 127.0.0.1: the
class URL comes from the environment (the notebook's secrets are not there outside Colab and
Kaggle), the data is downloaded from the fake Hub, and the worker trains real units for a
running coordinator. ``faces.ipynb`` loads a generator folder the way it loads a Hub repo.
The install cells run too (they install nothing when the package is importable).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from fakehub import FakeHub
from helpers import REPO, _fetch, _spawn, _stop, _wait_for_worker_state

NOTEBOOKS = REPO / "notebooks"


def _set_parameters(nb: Any, **values: Any) -> None:
    """Replace assignments in the cell tagged ``parameters`` (papermill's convention)."""
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    lines = cell.source.splitlines()
    for name, value in values.items():
        hits = [i for i, line in enumerate(lines) if line.startswith(f"{name} = ")]
        assert hits, f"no {name} in the parameters cell"
        lines[hits[0]] = f"{name} = {value!r}"
    cell.source = "\n".join(lines)


def _execute(nb: Any, cwd: Path, timeout: int = 300) -> Any:
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _text(nb: Any) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def _images(cell: Any) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def test_notebooks_are_valid_and_clean() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: saved with outputs"
        assert [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])], path.name



@pytest.mark.slow(15)
def test_worker_notebook_joins_a_class_and_trains(migrated_url: str, synth_zip: Path, tmp_path: Path,
                                                  fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.files[("class/celeba", "data/faces.zip")] = synth_zip.read_bytes()
    # What the kernel sees: the class URL where the notebook looks after the secrets, a name,
    # a private Hub cache, the fake Hub, one CPU thread.
    monkeypatch.setenv("GANNS_DB_URL", migrated_url)
    monkeypatch.setenv("GANNS_NAME", "nb-student")
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("HF_TOKEN", "DATABASE_URL", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    coordinator = _spawn("coordinator", "--db", migrated_url, "--data", str(synth_zip), "--local-steps", "2",
                         "--unit-size", "8", "--max-steps", "2", "--eval-every", "0", "--spot-check", "0",
                         "--out", str(tmp_path / "out"), log=tmp_path / "coordinator.log")
    try:
        nb = nbformat.read(NOTEBOOKS / "worker.ipynb", as_version=4)
        _set_parameters(nb, DATA="hf://class/celeba/data/faces.zip", DEVICE="cpu", MAX_UNITS=2)
        _execute(nb, tmp_path)
        assert coordinator.wait(120) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
    finally:
        _stop(coordinator)
    text = _text(nb)
    assert "ganns-async is ready" in text and "joining as nb-student" in text
    assert migrated_url not in text, "the URL (with its password) is never printed"
    assert "unit done: 2 units" in text and "stopped after 2 units" in text, text
    rows = asyncio.run(_fetch(migrated_url, "SELECT w.name, count(*) AS n FROM work_units u "
                                            "JOIN workers w ON w.id = u.worker_id "
                                            "WHERE u.state IN ('done', 'used') GROUP BY w.name"))
    assert [(r["name"], r["n"]) for r in rows] == [("nb-student", 2)]
    gets = [r for r in fake_hub.of("resolve") if r["method"] == "GET"]
    assert len(gets) == 1 and gets[0]["path"].endswith("/data/faces.zip")
    state = asyncio.run(_fetch(migrated_url, "SELECT state FROM workers WHERE name = 'nb-student'"))
    assert [r["state"] for r in state] == ["offline"], "stopping the cell says goodbye"


@pytest.mark.slow(6)
def test_stopping_the_worker_cell_gives_the_unit_back(migrated_url: str, synth_zip: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop button (a kernel interrupt) in the middle of a unit: the cell ends without an
    error, the unit goes back to the pool at once, and the worker says goodbye."""
    monkeypatch.setenv("GANNS_DB_URL", migrated_url)
    monkeypatch.setenv("GANNS_NAME", "nb-stopper")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    coordinator = _spawn("coordinator", "--db", migrated_url, "--data", str(synth_zip), "--local-steps", "16",
                         "--unit-size", "16", "--max-steps", "20", "--eval-every", "0", "--spot-check", "0",
                         "--out", str(tmp_path / "out"), log=tmp_path / "coordinator.log")
    nb = nbformat.read(NOTEBOOKS / "worker.ipynb", as_version=4)
    _set_parameters(nb, DATA=str(synth_zip), DEVICE="cpu", MAX_UNITS=None)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    try:
        with client.setup_kernel():
            for i in code[:-1]:
                client.execute_cell(nb.cells[i], i)

            def stop_when_computing() -> None:
                asyncio.run(_wait_for_worker_state(migrated_url, "nb-stopper", "computing"))
                client.km.provisioner.process.send_signal(signal.SIGINT)  # Jupyter's Interrupt

            stopper = threading.Thread(target=stop_when_computing, daemon=True)
            stopper.start()
            t0 = time.monotonic()
            client.execute_cell(nb.cells[code[-1]], code[-1])  # ends without an error
            took = time.monotonic() - t0
            stopper.join(10)
    finally:
        _stop(coordinator)
    text = "".join(o.get("text", "") for o in nb.cells[code[-1]].outputs)
    assert "stopping: giving the current unit back" in text and "stopped after" in text, text
    assert took < 120, took
    held = asyncio.run(_fetch(migrated_url, "SELECT id FROM work_units WHERE state = 'claimed'"))
    assert held == [], "the unit in hand went back at once, no lease to wait out"
    state = asyncio.run(_fetch(migrated_url, "SELECT state FROM workers WHERE name = 'nb-stopper'"))
    assert [r["state"] for r in state] == ["offline"]


def test_worker_notebook_without_a_url_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GANNS_DB_URL", "DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    nb = nbformat.read(NOTEBOOKS / "worker.ipynb", as_version=4)
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError) as err:
        _execute(nb, tmp_path, timeout=120)
    assert "no database URL: add it as the notebook secret GANNS_DB_URL" in str(err.value)


def test_faces_notebook_draws_faces_and_a_walk(tmp_path: Path) -> None:
    from ganns_async.outputs import write_generator
    from ganns_async.training import Trainer, TrainConfig

    folder = write_generator(Trainer(TrainConfig(seed=1)), tmp_path / "run", {"step": 1})
    nb = nbformat.read(NOTEBOOKS / "faces.ipynb", as_version=4)
    _set_parameters(nb, MODEL=str(folder), SEED=3)
    _execute(nb, tmp_path)
    assert "3,576,704 parameters" in _text(nb)
    drawn = [c for c in nb.cells if c.cell_type == "code" and _images(c)]
    assert len(drawn) == 2, "the grid and the walk are drawn"
