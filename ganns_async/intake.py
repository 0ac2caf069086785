"""The coordinator's inbound half: stored gradients -> validated -> folded into their step.

Gradients are fetched and decoded several at a time (zstd, msgpack and torch release the
GIL) and each is summed into its step's :class:`StepAccumulator` as soon as it is decoded,
on the coordinator's train thread. :class:`StepBook` says what each gradient is worth; a
gradient that fails validation is refused and its unit recomputed elsewhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ganns_async import codec
from ganns_async.db import lost_connection_in
from ganns_async.errors import PayloadError
from ganns_async.replication import EXACT_TOLERANCE, LOCAL_TOLERANCE, SpotCheck, compare
from ganns_async.screening import Norms, ResultScreen
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

log = logging.getLogger("ganns_async.coordinator")

MAX_UNIT_ATTEMPTS = 3  # a unit whose gradient was rejected this often is given up on
QUARANTINE_AFTER = 3   # results refused (or units reported unusable) before a worker gets no more units
# Gradients fetched and decoded at once: enough to overlap network, zstd and float64
# summing; each in flight holds one blob and its decoded tensors (about 50 MB).
PARALLEL_FETCHES = max(2, min(4, os.cpu_count() or 2))
LOGIN_ONLINE_S = 60.0  # a login with a worker seen this recently can compute a copy
# Results held for a copy at once (about 25 MB each). A new worker's check is deferred, not
# skipped, while the limit is reached: its next result is checked instead.
MAX_HELD = 8


@dataclass(frozen=True)
class Held:
    """A checked result waiting for a copy of its unit to agree with it."""

    row: GradientRow
    result: UnitResult
    norms: Norms


class GradientIntake:
    def __init__(self, store: CoordinatorStore, book: StepBook, *, run_id: int, trainer: Any, config: TrainConfig,
                 fold_thread: concurrent.futures.Executor,
                 event: Callable[[str, str], Awaitable[None]], spot_check: float = 0.0) -> None:
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
        self.screen = ResultScreen()
        self.spot = SpotCheck(rate=spot_check, seed=config.seed)
        self.tolerance = LOCAL_TOLERANCE if config.local else EXACT_TOLERANCE
        self._held: dict[int, list[Held]] = {}  # unit id -> results waiting for a copy to agree
        self.replicated = 0
        self.disagreements = 0
        self.stale_dropped = 0
        self.rejected = 0

    def take(self, step: int) -> StepAccumulator:
        """The closing step's sums (empty if nothing arrived); forgotten here, with any of its
        results still waiting for a copy (the step closed without them)."""
        for unit_id in [u for u, held in self._held.items() if held[0].row.step <= step]:
            del self._held[unit_id]
        return self._acc.pop(step, None) or StepAccumulator(step)

    def peek(self, step: int) -> StepAccumulator:
        return self._acc.get(step) or StepAccumulator(step)

    async def drain(self) -> None:
        """Fetch, decode and fold every stored gradient, several at once."""
        for unit_id, step, seq, replica_of in await self.store.cancelled_units(self.run_id, self.book.step):
            if replica_of is not None:
                if self._held.pop(replica_of, None) is not None:  # its check cannot happen now
                    self.book.give_up(step, replica_of)
            elif self.book.planned(step, seq):  # a unit planted by hand is no part of any round
                self.book.give_up(step, unit_id)  # reported unusable by a trusted worker
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
            try:
                async with asyncio.TaskGroup() as group:
                    for take in takes:
                        group.create_task(take)
            except BaseExceptionGroup as errors:
                # Fetches that lost the connection together (a server restart) fail as one
                # group: the loop retries a lost connection, and knows single errors only.
                lost = lost_connection_in(errors)
                if lost is None:
                    raise
                raise lost from errors

    async def _take(self, g: GradientRow) -> None:
        self._in_flight.add(g.id)
        loop = asyncio.get_running_loop()
        try:
            async with self._slots:
                blob = await self.store.gradient_payload(g.id)
                try:
                    if blob is None:
                        raise PayloadError("gradient row vanished")
                    result, norms = await loop.run_in_executor(self._decoders, self._decode, blob, g.n_samples)
                except PayloadError as exc:
                    await self._reject(g, str(exc))
                    return
                del blob
                if g.replica_of is not None:
                    await self._check_copy(g, Held(g, result, norms))
                    return
                # A copy must go to another login: with one login online nobody could check.
                if (len(self._held) < MAX_HELD and self.spot.wanted(g.worker_id)
                        and await self.store.logins_online(self.run_id, LOGIN_ONLINE_S) >= 2):
                    # Held until a copy computed by another login agrees (replication).
                    self._held[g.unit_id] = [Held(g, result, norms)]
                    self.replicated += 1
                    await self.store.replicate(g, g.unit_id)
                    return
                # Inside the slot: at most PARALLEL_FETCHES decoded results wait in memory.
                await self._fold(g.step, g.unit_id, Held(g, result, norms))
                del result
            await self.store.consume_gradient(g)
        finally:
            self._in_flight.discard(g.id)

    async def _fold(self, step: int, unit_id: int, held: Held) -> None:
        """Count ``held`` as unit ``unit_id``'s result."""
        acc = self._acc.get(step)
        if acc is None:
            acc = self._acc[step] = StepAccumulator(step)
        # Summing 6M floats is work for the train thread, not the event loop.
        await asyncio.get_running_loop().run_in_executor(self._fold_thread, acc.add, unit_id, held.result,
                                                         held.row.worker_id)
        self.screen.accept(held.norms)
        self.book.folded(step, unit_id)

    async def _check_copy(self, g: GradientRow, copy: Held) -> None:
        """A copy's result arrived: the original counts once they agree; if they do not, a
        third worker decides, and a worker whose result agrees with neither other is
        quarantined. Decisions are made in memory before the database hears of them, so a
        lost connection (the copy's row is read again) cannot make one copy vote twice."""
        original = g.replica_of
        assert original is not None
        held = self._held.get(original)
        if held is None:  # its step closed, or this coordinator restarted: nothing to check
            await self.store.consume_gradient(g)
            return
        if any(h.row.id == g.id for h in held):  # seen before a lost connection: finish the job
            await self.store.replicate(g, original)
            return
        first = held[0]
        loop = asyncio.get_running_loop()
        agreement = await loop.run_in_executor(self._decoders, compare, first.result, copy.result)
        if len(held) == 1:
            if agreement.within(self.tolerance):
                log.info("unit %s checked: %s and %s agree (%s)", original, first.row.who, g.who,
                         agreement.describe())
                del self._held[original]
                self.spot.confirmed(first.row.worker_id)
                self.spot.confirmed(g.worker_id)
                await self._fold(first.row.step, original, first)
                await self.store.consume_gradient(g)
                return
            self.disagreements += 1
            if await self.store.logins_online(self.run_id, LOGIN_ONLINE_S) < 3:
                del self._held[original]
                self.book.give_up(first.row.step, original)
                await self.store.consume_gradient(g)
                await self._event("replica", f"unit {original}: the results of {first.row.who} and {g.who} "
                                             f"disagree ({agreement.describe()}) and no third login is online to "
                                             "decide; the step goes on without it")
                return
            held.append(copy)
            await self.store.replicate(g, original)
            await self._event("replica", f"unit {original}: the results of {first.row.who} and {g.who} disagree "
                                         f"({agreement.describe()}); a third worker decides")
            return
        second = held[1]
        with_first = agreement.within(self.tolerance)
        with_second = (await loop.run_in_executor(self._decoders, compare, second.result,
                                                  copy.result)).within(self.tolerance)
        del self._held[original]
        good: Held | None
        bad: Held | None
        if with_first and with_second:
            good, bad = first, None
        elif with_first or with_second:
            good, bad = (first, second) if with_first else (second, first)
        else:
            good = bad = None
        if good is not None:
            await self._fold(good.row.step, original, good)
        else:
            self.book.give_up(first.row.step, original)
        await self.store.consume_gradient(g)
        if good is None:
            await self._event("replica", f"unit {original}: three results, no two agree; the step goes on without it")
        elif bad is not None:
            if bad.row.worker_id is not None:
                await self.store.quarantine_now(bad.row.worker_id, f"its result for unit {original} disagreed "
                                                                   "with two other workers")
            await self._event("quarantine", f"{bad.row.who} is quarantined: its result for unit {original} "
                                            f"disagreed with those of {good.row.who} and {g.who}")

    async def give_up_held(self, step: int) -> None:
        """At ``step``'s deadline: results of it still waiting for a copy (nobody eligible took
        it) are given up, so the step can close on what arrived."""
        for unit_id in [u for u, held in self._held.items() if held[0].row.step == step]:
            held = self._held.pop(unit_id)
            self.book.give_up(step, unit_id)
            await self._event("replica", f"unit {unit_id}: no copy checked {held[0].row.who}'s result by the step's "
                                         "deadline; the step goes on without it")

    async def _reject(self, g: GradientRow, reason: str) -> None:
        self.rejected += 1
        state = await self.store.reject_gradient(self.run_id, g, reason, MAX_UNIT_ATTEMPTS)
        if state == "cancelled":
            # First: the step must not wait for it whatever happens next. A copy given up on
            # gives up the result it was to check.
            unit = g.replica_of if g.replica_of is not None else g.unit_id
            if g.replica_of is None or self._held.pop(g.replica_of, None) is not None:
                self.book.give_up(g.step, unit)
        await self._event("rejected", f"gradient from {g.who} for unit {g.unit_id} rejected: {reason}")
        if g.worker_id is not None and await self.store.quarantine(g.worker_id, QUARANTINE_AFTER,
                                                                   f"{QUARANTINE_AFTER} results refused"):
            await self._event("quarantine", f"{g.who} is quarantined: {QUARANTINE_AFTER} of its results were "
                                            "refused; it gets no more units")
        if state == "cancelled":
            await self._event("rejected", f"unit {g.unit_id} gave bad gradients {MAX_UNIT_ATTEMPTS} times; "
                                          "step goes on without it")

    def _decode(self, blob: bytes, n_samples: int) -> tuple[UnitResult, Norms]:
        """On a decoder thread: everything a worker sent is checked before it counts."""
        tensors, meta = codec.decode_tensors(blob, expected=self._spec, meta_schema=codec.GRADIENT_META)
        if meta.get("n_samples") != n_samples:
            raise PayloadError(f"payload says {meta.get('n_samples')!r} samples, row says {n_samples}")
        if n_samples > self.unit_size:
            raise PayloadError(f"{n_samples} samples in a unit of {self.unit_size}")
        if n_samples <= 0:
            raise PayloadError("an empty unit (0 samples) counts for nothing")
        metrics = meta.get("metrics") or {}
        if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
            raise PayloadError("metrics must be a map of numbers")
        result = split_result(tensors, self._g, self._d, n_samples, metrics)
        why = check_result(result, self.cfg)
        if why is None:
            why, norms = self.screen.check(result)
        if why is not None:
            raise PayloadError(why)
        return result, norms

    def close(self) -> None:
        self._decoders.shutdown(wait=False, cancel_futures=True)
