"""Pushing a run to the Hugging Face Hub while it trains: one push at a time, on its own
thread, backing off after failures; a failed push is logged and never stops training.

Every push sends the generator folder, samples and curves (about 15 MB); the training
checkpoint goes with the first push, then once ``checkpoint_every`` steps have passed since
the last one that did, and with the final push.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ganns_async.errors import UserError


class HubPublisher:
    def __init__(self, repo: str, *, private: bool, out: Path, checkpoint_every: int = 100,
                 event: Callable[[str], Awaitable[None]],
                 outputs_written: Callable[[], Awaitable[None]]) -> None:
        from ganns_async.hub import HubPusher

        self.repo = repo
        self.out = out
        self._event = event
        self._outputs_written = outputs_written
        self._pusher = HubPusher(repo, private=private)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub")
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self._not_before = 0.0
        self.checkpoint_every = checkpoint_every
        self._checkpoint_pushed: int | None = None  # step of the last pushed training checkpoint

    def check_token(self) -> None:
        """No token at all: say so now, not after an hour of training."""
        try:
            self._pusher.check_token()
        except Exception as exc:  # noqa: BLE001
            raise UserError(str(exc)) from None

    def maybe_push(self, info: dict[str, Any], *, final: bool = False) -> None:
        """Start a push unless one is running or we are backing off after failures."""
        if self._task is not None and not self._task.done():
            return
        if time.monotonic() < self._not_before:
            return
        step = int(info["step"])
        checkpoint = (final or self._checkpoint_pushed is None
                      or step - self._checkpoint_pushed >= self.checkpoint_every)
        self._task = asyncio.create_task(self._push(info, checkpoint), name=f"push-{step}")

    async def final_push(self, info: dict[str, Any]) -> None:
        """The final state is worth one more try, whatever the backoff says."""
        await self.wait()
        self._not_before = 0.0
        self.maybe_push(info, final=True)
        await self.wait()

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _push(self, info: dict[str, Any], checkpoint: bool) -> None:
        from ganns_async.hub import PushError, push_backoff

        await self._outputs_written()  # the files of this step are written first
        push = functools.partial(self._pusher.push, self.out, info, checkpoint=checkpoint)
        try:
            url = await asyncio.get_running_loop().run_in_executor(self._executor, push)
        except Exception as exc:  # noqa: BLE001 - a push must never stop training
            self._failures += 1
            delay = push_backoff(self._failures)
            if isinstance(exc, PushError) and not exc.transient:
                delay = max(delay, 600.0)
            self._not_before = time.monotonic() + delay
            await self._event(f"push of step {info['step']} to {self.repo} failed: {exc}; "
                              f"next try in {delay:.0f}s or later")
            return
        self._failures = 0
        if checkpoint:
            self._checkpoint_pushed = int(info["step"])
        with_ckpt = " with the training checkpoint" if checkpoint else ""
        await self._event(f"pushed step {info['step']}{with_ckpt} to {url}")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
