"""The coordinator's inbound half: stored gradients -> validated -> folded into their step.

Gradients are fetched and decoded several at a time (zstd, msgpack and torch release the
GIL) and each is summed into its step's :class:`StepAccumulator` as soon as it is decoded,
on the coordinator's train thread. :class:`StepBook` says what each gradient is worth; a
gradient that fails validation is refused and its unit recomputed elsewhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Awaitable, Callable
from typing import Any

from ganns_async import codec
from ganns_async.errors import PayloadError
from ganns_async.steps import Admission, StepBook
from ganns_async.store import CoordinatorStore, GradientRow
from ganns_async.training import (
    StepAccumulator,
    TrainConfig,
    check_result,
    UnitResult,
    gradient_spec,
    split_result,
)

MAX_UNIT_ATTEMPTS = 3  # a unit whose gradient was rejected this often is given up on
# Gradients fetched and decoded at once: enough to overlap network, zstd and float64
# summing; each in flight holds one blob and its decoded tensors (about 50 MB).
PARALLEL_FETCHES = max(2, min(4, os.cpu_count() or 2))


class GradientIntake:
    def __init__(self, store: CoordinatorStore, book: StepBook, *, run_id: int, trainer: Any, config: TrainConfig,
                 fold_thread: concurrent.futures.Executor,
                 event: Callable[[str, str], Awaitable[None]]) -> None:
        self.store = store
        self.book = book
        self.run_id = run_id
        self.cfg = config
        self.unit_size = config.images_per_unit  # images a unit may report
        self._g, self._d = trainer.g, trainer.d
        self._spec = gradient_spec(trainer.g, trainer.d)
        self._fold_thread = fold_thread
        self._event = event
        self._decoders = concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL_FETCHES,
                                                               thread_name_prefix="decode")
        self._slots = asyncio.Semaphore(PARALLEL_FETCHES)
        self._in_flight: set[int] = set()  # gradient ids being fetched or decoded
        self._acc: dict[int, StepAccumulator] = {}
        self.stale_dropped = 0
        self.rejected = 0

    def take(self, step: int) -> StepAccumulator:
        """The closing step's sums (empty if nothing arrived); forgotten here."""
        return self._acc.pop(step, None) or StepAccumulator(step)

    def peek(self, step: int) -> StepAccumulator:
        return self._acc.get(step) or StepAccumulator(step)

    async def drain(self) -> None:
        """Fetch, decode and fold every stored gradient, several at once."""
        takes = []
        for g in await self.store.pending_gradients(self.run_id):
            if g.id in self._in_flight:
                continue
            verdict = self.book.admit(unit_id=g.unit_id, unit_step=g.step, version=g.version,
                                      unit_done=g.unit_state == "done")
            if verdict is Admission.STALE:
                self.stale_dropped += 1
                await self.store.drop_gradient(g)
                await self._event("stale", f"dropped a gradient from {g.who} for closed step {g.step} "
                                           f"(unit {g.unit_id})")
            elif verdict is Admission.DUPLICATE:
                await self.store.consume_gradient(g)  # folded before a lost connection; finish the job
            else:
                takes.append(self._take(g))
        if takes:
            # A TaskGroup, not gather: if one fails (a lost connection), the others stop
            # too instead of folding on behind the loop's back; what they had not finished
            # is found again by the next drain (each unit still counts once).
            async with asyncio.TaskGroup() as group:
                for take in takes:
                    group.create_task(take)

    async def _take(self, g: GradientRow) -> None:
        self._in_flight.add(g.id)
        loop = asyncio.get_running_loop()
        try:
            async with self._slots:
                blob = await self.store.gradient_payload(g.id)
                try:
                    if blob is None:
                        raise PayloadError("gradient row vanished")
                    result = await loop.run_in_executor(self._decoders, self._decode, blob, g.n_samples)
                except PayloadError as exc:
                    await self._reject(g, str(exc))
                    return
                del blob
                acc = self._acc.get(g.step)
                if acc is None:
                    acc = self._acc[g.step] = StepAccumulator(g.step)
                # Summing 6M floats is work for the train thread, not the event loop. Still
                # inside the slot, so at most PARALLEL_FETCHES decoded gradients wait in memory.
                await loop.run_in_executor(self._fold_thread, acc.add, g.unit_id, result, g.worker_id)
                del result
            self.book.folded(g.step, g.unit_id)
            await self.store.consume_gradient(g)
        finally:
            self._in_flight.discard(g.id)

    async def _reject(self, g: GradientRow, reason: str) -> None:
        self.rejected += 1
        state = await self.store.reject_gradient(self.run_id, g, reason, MAX_UNIT_ATTEMPTS)
        if state == "cancelled":
            self.book.give_up(g.step, g.unit_id)  # first: the step must not wait for it whatever happens next
        await self._event("rejected", f"gradient from {g.who} for unit {g.unit_id} rejected: {reason}")
        if state == "cancelled":
            await self._event("rejected", f"unit {g.unit_id} gave bad gradients {MAX_UNIT_ATTEMPTS} times; "
                                          "step goes on without it")

    def _decode(self, blob: bytes, n_samples: int) -> UnitResult:
        """On a decoder thread: everything a worker sent is checked before it counts."""
        tensors, meta = codec.decode_tensors(blob, expected=self._spec)
        if meta.get("n_samples") != n_samples:
            raise PayloadError(f"payload says {meta.get('n_samples')!r} samples, row says {n_samples}")
        if n_samples > self.unit_size:
            raise PayloadError(f"{n_samples} samples in a unit of {self.unit_size}")
        metrics = meta.get("metrics") or {}
        if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
            raise PayloadError("metrics must be a map of numbers")
        result = split_result(tensors, self._g, self._d, n_samples, metrics)
        why = check_result(result, self.cfg)
        if why is not None:
            raise PayloadError(why)
        return result

    def close(self) -> None:
        self._decoders.shutdown(wait=False, cancel_futures=True)
