"""Joining a class from a notebook (Colab, Kaggle, Jupyter): ``notebooks/worker.ipynb``.

The class's database URL comes from the notebook's secrets (Colab's ``userdata``, Kaggle's
``UserSecretsClient``), then the environment, then a hidden prompt; the data comes from the
Hub with a progress bar; the worker prints one line per event instead of redrawing a
terminal dashboard, which a notebook cell cannot show. Everything a notebook needs is here,
so the notebook itself stays a handful of short cells.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from ganns_async.errors import UserError
from ganns_async.states import WorkerState

SECRET_NAME = "GANNS_DB_URL"
DEFAULT_DATA = "hf://gperdrizet/GANNs-with-friends/data/img_align_celeba.zip"
_NAME_PROMPT = "Your name, as the class dashboard will show it: "


def _colab_secret(name: str) -> str | None:
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return userdata.get(name) or None
    except Exception as exc:  # noqa: BLE001 - SecretNotFoundError, NotebookAccessError
        kind = type(exc).__name__
        if "Access" in kind:
            raise UserError(f"this notebook may not read the secret {name}: open the key icon on the left and "
                            "turn on 'Notebook access' for it, then run this cell again") from None
        return None


def _kaggle_secret(name: str) -> str | None:
    try:
        from kaggle_secrets import UserSecretsClient  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return UserSecretsClient().get_secret(name) or None
    except Exception:  # noqa: BLE001 - not attached to this notebook
        return None


def class_database_url(secret: str = SECRET_NAME, *, prompt: bool = True) -> str:
    """The class's PostgreSQL URL: the notebook's secret ``secret`` (Colab, Kaggle), else the
    environment (``GANNS_DB_URL``, then ``DATABASE_URL``), else a hidden prompt.

    The URL holds your password: it is never printed.
    """
    for source in (_colab_secret, _kaggle_secret):
        value = source(secret)
        if value:
            return value.strip()
    for var in (secret, "GANNS_DB_URL", "DATABASE_URL"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    if prompt:
        try:
            value = getpass.getpass("The class's database URL (from your instructor; it is not shown): ").strip()
        except (EOFError, OSError, NotImplementedError):  # no way to ask (a batch run)
            value = ""
        if value:
            return value
    raise UserError(f"no database URL: add it as the notebook secret {secret} (Colab: the key icon on the left; "
                    "Kaggle: Add-ons > Secrets), or set GANNS_DB_URL")


def ask_name(default: str | None = None) -> str:
    """``GANNS_NAME``, else ask; an empty answer keeps ``default`` (else ``user@host``).

    On a student login the server names the worker after the login anyway.
    """
    from ganns_async.worker import default_name

    name = os.environ.get("GANNS_NAME", "").strip()
    if not name:
        try:
            name = input(_NAME_PROMPT).strip()
        except (EOFError, OSError, NotImplementedError):
            name = ""
    return name or default or default_name()


def fetch_data(data: str = DEFAULT_DATA) -> str:
    """A local path for ``data``: ``hf://...`` is downloaded once (a progress bar in the
    notebook; later calls use the Hub cache), a local path is returned as is."""
    from ganns_async.hub import resolve_data

    path = resolve_data(data)
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist: pass the class's dataset (a zip of faces, or {DEFAULT_DATA})")
    return path


class CellReport:
    """Prints what a worker does, one timestamped line per change (cells cannot redraw a
    terminal dashboard; a line per unit reads well in a notebook and in its saved output)."""

    def __init__(self, out: TextIO | None = None, clock: Callable[[], float] = time.time) -> None:
        self.out = out
        self.clock = clock
        self._last: tuple[Any, ...] | None = None
        self._units = 0

    def _say(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.clock()))
        print(f"[{stamp}] {text}", file=self.out or sys.stdout, flush=True)

    def __call__(self, status: Any) -> None:
        if status.units_done > self._units:
            self._units = status.units_done
            rate = f", {status.images_per_s:,.0f} images/s" if status.images_per_s > 0 else ""
            units = f"{status.units_done:,} unit{'' if status.units_done == 1 else 's'}"
            self._say(f"unit done: {units}, {status.images_done:,} images so far{rate}")
        key = (status.state, status.connection, status.message, status.run_id)
        if key == self._last:
            return
        self._last = key
        if status.connection != "connected":
            self._say(f"database: {status.connection}")
        elif status.message:
            self._say(status.message)
        elif status.state == WorkerState.COMPUTING and status.unit_step is not None:
            self._say(f"computing a unit of round {status.unit_step}")
        elif status.state == WorkerState.WAITING:
            self._say("waiting for work (the instructor's coordinator publishes it)")
        elif status.state == WorkerState.PAUSED:
            self._say("the run is paused by the instructor")


async def join(db_url: str, data: str, name: str | None = None, *, device: str = "auto",
               max_units: int | None = None, out: TextIO | None = None) -> int:
    """Run a worker in this notebook until the cell is stopped (or ``max_units`` are done).

    Use it with ``await`` in a cell (Jupyter, Colab and Kaggle run top-level ``await``).
    Stopping the cell (its stop button, or Interrupt) gives the unit in hand back at once
    and ends the cell without an error. Returns the units done.
    """
    from ganns_async.worker import Worker, WorkerOptions

    report = CellReport(out)
    worker: Worker | None = None
    done = asyncio.Event()

    def on_status(status: Any) -> None:
        report(status)
        if max_units is not None and status.units_done >= max_units:
            done.set()

    logging.getLogger("ganns_async").setLevel(logging.WARNING)  # the report says what matters
    worker = Worker(WorkerOptions(db_url=db_url, data=data, name=name, device=device), on_status=on_status)
    task = asyncio.ensure_future(worker.run())
    stopper = asyncio.ensure_future(done.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # an error ends the cell with its one-line message
    except (KeyboardInterrupt, asyncio.CancelledError):
        # The cell's stop button: Jupyter cancels the cell (or raises KeyboardInterrupt).
        # Stopping is what the student asked for, not an error: give the unit back below
        # and end the cell quietly instead of with a traceback.
        report._say("stopping: giving the current unit back ...")
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # the worker gives its unit back and says goodbye
        report._say(f"stopped after {worker.status.units_done:,} units ({worker.status.images_done:,} images)")
    return worker.status.units_done
