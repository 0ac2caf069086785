"""SWD during training: on its own thread, from a snapshot of the sampling generator."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ganns_async.training import Trainer

log = logging.getLogger("ganns_async.coordinator")


class Evaluator:
    """Schedules sliced-Wasserstein evaluations without delaying aggregation.

    The snapshot of G is taken on the train thread (after this step's update, before the
    next one, and without copying 14 MB on the event loop); the evaluation itself runs on
    a thread of its own. ``record(step, swd)`` stores each result.
    """

    def __init__(self, dataset: Any, *, n: int, seed: int, train: concurrent.futures.Executor,
                 record: Callable[[int, float], Awaitable[None]]) -> None:
        self.dataset = dataset
        self.n = n
        self.seed = seed
        self._train = train
        self._record = record
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval")
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self.swd: dict[int, float] = {}

    def schedule(self, step: int, trainer: Trainer) -> None:
        if step in self._tasks or step in self.swd:
            return
        snapshot = self._train.submit(lambda: copy.deepcopy(trainer.sampler).cpu())
        self._tasks[step] = asyncio.create_task(self._run(step, snapshot), name=f"eval-{step}")

    async def _run(self, step: int, snapshot: concurrent.futures.Future[Any]) -> None:
        from ganns_async.quality import evaluate_generator

        g = await asyncio.wrap_future(snapshot)
        dataset, n, seed = self.dataset, self.n, self.seed
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: evaluate_generator(g, dataset, n=n, seed=seed))
        except Exception as exc:  # noqa: BLE001 - a failed evaluation must not stop training
            log.warning("evaluation at step %d failed: %s", step, exc)
            return
        swd = float(result["swd_avg"])
        self.swd[step] = swd
        log.info("step %d: SWD x1e3 = %.1f", step, swd)
        await self._record(step, swd)

    def latest(self) -> float | None:
        return self.swd[max(self.swd)] if self.swd else None

    def summary(self) -> str | None:
        if not self.swd:
            return None
        first, last = min(self.swd), max(self.swd)
        return f"SWD x1e3: {self.swd[first]:.1f} at step {first} -> {self.swd[last]:.1f} at step {last}"

    async def wait(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
