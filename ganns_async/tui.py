"""One ``Live`` per process: redraw a pure view of the latest snapshot a few times a second.

The loops that train and claim never wait for this: they only update snapshots (plain
attribute writes); this task reads them and draws. Each frame asks the console for its
current size, so resizing the terminal just works.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console, RenderableType
from rich.live import Live


def want_tui(no_tui: bool) -> bool:
    """The dashboard is the default on a terminal; pipes, files and CI get log lines."""
    return not no_tui and sys.stdout.isatty()


class LiveView:
    def __init__(self, render: Callable[[int, int], RenderableType], *, fps: float = 4.0,
                 console: Console | None = None) -> None:
        self.render = render
        self.fps = fps
        self.console = console or Console()
        self.frames = 0  # test signal

    async def run(self) -> None:
        with Live(console=self.console, auto_refresh=False, screen=True,
                  redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                width, height = self.console.size
                try:
                    view = self.render(width, height)
                except Exception as exc:  # noqa: BLE001 - a drawing bug must not stop training
                    view = f"[red]dashboard error: {exc}[/]"
                live.update(view, refresh=True)
                self.frames += 1
                await asyncio.sleep(1.0 / self.fps)


class RecentLogHandler(logging.Handler):
    """Keeps the last log lines in memory, for the dashboard's message line."""

    def __init__(self, maxlen: int = 50) -> None:
        super().__init__(level=logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=maxlen)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def route_logging_for_tui(log_file: Path | None = None) -> RecentLogHandler:
    """Log lines would tear the dashboard apart: send them to memory (and a file) instead."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    recent = RecentLogHandler()
    root.addHandler(recent)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(fh)
    return recent


async def run_with_view(main: asyncio.Future[int] | asyncio.Task[int], *others: Callable[[], asyncio.Future[None]]) -> int:
    """Run ``main`` with helper tasks (dashboard, feeders); stop the helpers when it ends."""
    helpers = [asyncio.ensure_future(make()) for make in others]
    try:
        return await main
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
