"""The coordinator: owns the model, publishes weights and work units, steps Adam.

One asyncio loop. It wakes on ``ganns_gradients`` notifications, folds each new
gradient into its step's running mean, and closes a step when all of its units have
arrived (or after ``step_timeout`` with at least ``min_units``). Aggregation, Adam,
encoding and checkpoint writing run on one compute thread, in order.

Besides notifications, one periodic query runs: a safety sweep every ``sweep_s``
seconds that returns units with expired leases to pending and picks up any gradient
whose notification was lost while the listener reconnected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ganns_async import codec
from ganns_async.data import ImageDataset
from ganns_async.db import (
    CONNECTION_ERRORS,
    CONTROL_CHANNEL,
    GRADIENTS_CHANNEL,
    Database,
    Listener,
    backoff_delays,
    hold_run_lock,
)
from ganns_async.errors import PayloadError, UserError
from ganns_async.migrate import require_migrated
from ganns_async.outputs import CHECKPOINT_NAME, write_checkpoint, write_sample_grid
from ganns_async.training import (
    StepAccumulator,
    TrainConfig,
    Trainer,
    gradient_spec,
    plan_unit,
    split_result,
)

log = logging.getLogger("ganns_async.coordinator")

MAX_UNIT_ATTEMPTS = 3  # a unit whose gradient was rejected this often is given up on

@dataclass
class CoordinatorOptions:
    db_url: str
    data: str
    out: Path = Path("ganns-out")
    max_steps: int | None = None
    resume: bool = False
    config: TrainConfig = field(default_factory=TrainConfig)
    step_timeout: float = 300.0
    min_units: int = 1
    checkpoint_every: int = 10
    eval_every: int = 10  # SWD every N steps (0: never)
    eval_n: int = 512  # images per side for SWD during training
    hf_repo: str | None = None  # push checkpoint, samples and a model card here
    hf_push_every: int | None = None  # steps between pushes [default: checkpoint_every]
    hf_private: bool = False
    sweep_s: float = 15.0


@dataclass
class CoordinatorStatus:
    run_id: int | None = None
    step: int = 0
    epoch: int = 0
    images_seen: int = 0
    last_step_at: float = 0.0
    stale_dropped: int = 0
    rejected: int = 0
    requeued: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class Coordinator:
    def __init__(self, opts: CoordinatorOptions, *, on_status: Callable[[CoordinatorStatus], None] | None = None) -> None:
        self.opts = opts
        self.on_status = on_status
        self.status = CoordinatorStatus()
        self.wake = asyncio.Event()
        self.db: Database | None = None
        self.listener: Listener | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        self._pending_io: list[concurrent.futures.Future[Any]] = []
        # Evaluation gets its own thread and a copy of G, so it never delays aggregation.
        self._eval_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval")
        self._evals: dict[int, asyncio.Task[None]] = {}
        self.swd: dict[int, float] = {}
        # Hub pushes: one at a time, on their own thread; failures back off, never stop training.
        self._push_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub")
        self._push_task: asyncio.Task[None] | None = None
        self._pusher: Any = None
        self._lock_conn: Any = None
        self._given_up: dict[int, set[int]] = {}  # step -> units cancelled after repeated bad gradients
        self._push_failures = 0
        self._push_not_before = 0.0
        self.acc: dict[int, StepAccumulator] = {}
        self._backoff = iter(backoff_delays())
        self._control_changed = False
        self._contributors: set[int] = set()
        self.ready = asyncio.Event()  # test signal: run published, listening

    def _notify(self, channel: str, payload: str) -> None:
        if channel == CONTROL_CHANNEL:
            self._control_changed = True
        self.wake.set()

    async def _stopped_by_operator(self) -> bool:
        """`ganns-async control stop` (or a psql UPDATE) ends the run; pause just idles the workers."""
        if not self._control_changed:
            return False
        self._control_changed = False
        assert self.db is not None
        run = await self.db.fetchrow("get_run", self.run_id)
        if run is None or run["status"] != "stopped":
            return False
        self._write_outputs()
        for fut in self._pending_io:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(fut)
        await self._event("run", f"run {self.run_id} stopped by the operator at step {self.step}")
        return True

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _event(self, kind: str, message: str) -> None:
        assert self.db is not None
        log.info("%s: %s", kind, message)
        await self.db.execute("insert_event", self.run_id, kind, message)

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> int:
        opts = self.opts
        from ganns_async.hub import resolve_data

        local = await asyncio.to_thread(resolve_data, opts.data)
        self.dataset = await asyncio.to_thread(ImageDataset.open, local)
        self._pusher = None
        if opts.hf_repo:
            from ganns_async.hub import HubPusher

            self._pusher = HubPusher(opts.hf_repo, private=opts.hf_private)
            try:
                self._pusher.check_token()  # no token at all: say so now, not after an hour of training
            except Exception as exc:  # noqa: BLE001
                raise UserError(str(exc)) from None
        opts.out.mkdir(parents=True, exist_ok=True)
        self.db = await Database.open(opts.db_url)
        finished = False
        try:
            await require_migrated(self.db)
            self.listener = Listener(opts.db_url, [GRADIENTS_CHANNEL, CONTROL_CHANNEL], self._notify, self.wake.set)
            await self.listener.start()
            if opts.resume:
                await self._resume()
            else:
                await self._start_new()
            self.ready.set()
            finished = await self._loop()
        finally:
            await self._shutdown(finished)
        return 0

    async def _shutdown(self, finished: bool) -> None:
        for fut in self._pending_io:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(fut)
        db = self.db
        if db is not None and getattr(self, "run_id", None) is not None and not finished:
            # Interrupted: pause the run so workers idle; `--resume` picks it up again.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(db.execute("pause_run", self.run_id), 5)
                await asyncio.wait_for(db.execute(
                    "insert_event", self.run_id, "coordinator",
                    f"coordinator stopped at step {self.step}; continue with --resume"), 5)
                log.info("run %s paused at step %s; continue with `ganns-async coordinator --resume`",
                         self.run_id, self.step)
        if self.listener is not None:
            await self.listener.close()
        if self._lock_conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._lock_conn.close(), 5)
        if db is not None:
            await db.close()
        for task in self._evals.values():
            task.cancel()
        if self._push_task is not None:
            self._push_task.cancel()
        self._push_executor.shutdown(wait=False, cancel_futures=True)
        self._eval_executor.shutdown(wait=False, cancel_futures=True)
        self._executor.shutdown(wait=True)
        self.dataset.close()

    async def _start_new(self) -> None:
        assert self.db is not None
        cfg = self.opts.config
        self.cfg = cfg
        old = await self.db.fetchrow("active_run")
        if old is not None:
            await self.db.execute("set_run_status", old["id"], "stopped")
            log.info("run %s was still active: marked stopped (use --resume to continue a run)", old["id"])
        run = await self.db.fetchrow("create_run", cfg.to_json(), self.dataset.fingerprint, len(self.dataset))
        assert run is not None
        self.run_id = run["id"]
        self._lock_conn = await hold_run_lock(self.opts.db_url, self.run_id)
        self.trainer = Trainer(cfg)
        self.step = 0
        self.next_seq = 0
        self.images_seen = 0
        weights, optimizer = await self._in_thread(self._encode_state)
        await self.db.execute("insert_weights", self.run_id, 0, weights, optimizer)
        async with self.db.transaction() as tx:
            await self._queue_units(tx, upto_step=self.cfg.max_staleness, version=0)
            await tx.execute("advance_run", self.run_id, 0, self.next_seq, 0)
        await self._event("run", f"run {self.run_id} started: {len(self.dataset)} images, "
                                 f"{cfg.units_per_step} units x {cfg.unit_size} images per step")
        self._step_opened = time.monotonic()
        if self.opts.eval_every:
            self._schedule_eval()  # the step-0 baseline every later SWD is compared with
        self._publish()

    async def _resume(self) -> None:
        assert self.db is not None
        run = await self.db.fetchrow("latest_run")
        if run is None:
            raise UserError("nothing to resume: the database holds no run (start one without --resume)")
        if run["status"] == "done":
            raise UserError(f"run {run['id']} already finished at step {run['step']}; start a new run without --resume")
        if run["dataset_fingerprint"] != self.dataset.fingerprint:
            raise UserError(
                f"cannot resume run {run['id']}: it trained on a different dataset "
                f"(fingerprint {run['dataset_fingerprint']}, --data has {self.dataset.fingerprint})"
            )
        self._lock_conn = await hold_run_lock(self.opts.db_url, run["id"])
        if self._lock_conn is None:
            raise UserError(f"run {run['id']} is being coordinated by another process (it holds the run's lock); "
                            "stop that coordinator first")
        run = await self.db.fetchrow("get_run", run["id"])  # re-read now that it is ours
        assert run is not None
        self.run_id = run["id"]
        self.cfg = TrainConfig.from_json(run["config"])
        self.trainer = Trainer(self.cfg)
        self.step = run["step"]
        self.next_seq = run["next_seq"]
        self.images_seen = run["images_seen"]
        row = await self.db.fetchrow("weights_with_optimizer", self.run_id, self.step)
        if row is None:
            raise UserError(f"cannot resume run {self.run_id}: weights version {self.step} is missing from the database")
        await self._in_thread(self._load_state, row["payload"], row["optimizer"])
        await self.db.execute("delete_unannounced_weights", self.run_id, self.step)
        requeued = await self.db.fetch("requeue_lost_units", self.run_id, self.step)
        async with self.db.transaction() as tx:
            await self._queue_units(tx, upto_step=self.step + self.cfg.max_staleness, version=self.step)
            await tx.execute("advance_run", self.run_id, self.step, self.next_seq, 0)
            await tx.execute("set_run_status", self.run_id, "running")
        await self._event("run", f"run {self.run_id} resumed at step {self.step} "
                                 f"({len(requeued)} unit(s) queued again)")
        self._step_opened = time.monotonic()
        self._publish()

    def _load_state(self, payload: bytes, optimizer: bytes | None) -> None:
        tensors, _ = codec.decode_tensors(payload, expected=codec.tensor_spec(self.trainer.state()))
        self.trainer.load_state(tensors)
        if optimizer is not None:
            opt_tensors, meta = codec.decode_tensors(optimizer)
            self.trainer.load_optimizer_tensors(opt_tensors, meta)

    def _encode_state(self) -> tuple[bytes, bytes]:
        weights = codec.encode_tensors(self.trainer.state(), meta={"step": self.step})
        opt_tensors, meta = self.trainer.optimizer_tensors()
        return weights, codec.encode_tensors(opt_tensors, meta=meta)

    async def _queue_units(self, tx: Any, *, upto_step: int, version: int) -> None:
        """Create the units of every step up to ``upto_step`` that do not exist yet."""
        cfg = self.cfg
        if self.opts.max_steps is not None:
            upto_step = min(upto_step, self.opts.max_steps - 1)
        end_seq = (upto_step + 1) * cfg.units_per_step
        units = []
        for seq in range(self.next_seq, end_seq):
            p = plan_unit(cfg, len(self.dataset), seq)
            units.append({"seq": p.seq, "step": p.step, "version": version, "epoch": p.epoch,
                          "indices": p.indices, "noise_seed": p.noise_seed})
        if units:
            await tx.execute("insert_units", self.run_id, json.dumps(units))
            self.next_seq = end_seq

    # --- the loop ----------------------------------------------------------------------

    async def _loop(self) -> bool:
        """Returns True when max_steps was reached."""
        assert self.db is not None
        next_sweep = time.monotonic() + self.opts.sweep_s
        while True:
            if self.opts.max_steps is not None and self.step >= self.opts.max_steps:
                await self._finish()
                return True
            self.wake.clear()
            if await self._stopped_by_operator():
                return True
            try:
                await self._drain()
                now = time.monotonic()
                if now >= next_sweep:
                    await self._sweep()
                    next_sweep = now + self.opts.sweep_s
            except CONNECTION_ERRORS as exc:
                # Reading and folding gradients is safe to repeat (each unit counts once).
                delay = next(self._backoff)
                log.warning("database unavailable (%s); retrying in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                continue
            self._backoff = iter(backoff_delays())
            try:
                if await self._maybe_close_step():
                    continue
            except CONNECTION_ERRORS as exc:
                # Half a publish is not safe to repeat in memory; the database knows where we were.
                raise UserError(f"lost the database while publishing step {self.step}: {exc}; "
                                "restart the coordinator with --resume") from exc
            now = time.monotonic()
            deadline = self._step_opened + self.opts.step_timeout
            if self._overdue():
                deadline = next_sweep  # overdue but short of --min-units: wait for gradients, don't spin
            timeout = max(0.05, min(next_sweep, deadline) - now)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    async def _sweep(self) -> None:
        """The safety sweep: expired leases back to pending; lost notifications caught up by the next drain."""
        assert self.db is not None
        for row in await self.db.fetch("requeue_expired_leases", self.run_id):
            self.status.requeued += 1
            await self._event("requeue", f"unit {row['id']} (step {row['step']}) lease expired on "
                                         f"{row['worker_name'] or 'a departed worker'}; back to pending")

    async def _drain(self) -> None:
        """Fold every stored gradient into its step's accumulator."""
        assert self.db is not None
        rows = await self.db.fetch("pending_gradients", self.run_id)
        for row in rows:
            await self._take(row)

    async def _take(self, row: Any) -> None:
        assert self.db is not None
        who = row["worker_name"] or f"worker {row['worker_id']}"
        staleness = row["step"] - row["version"]
        if row["step"] < self.step or row["unit_state"] != "done" or staleness > self.cfg.max_staleness:
            self.status.stale_dropped += 1
            await self.db.execute("drop_gradient", row["id"], row["unit_id"])
            await self._event("stale", f"dropped a gradient from {who} for closed step {row['step']} (unit {row['unit_id']})")
            return
        blob = await self.db.fetchval("gradient_payload", row["id"])
        try:
            if blob is None:
                raise PayloadError("gradient row vanished")
            result = await self._in_thread(self._decode_gradient, blob, row["n_samples"])
        except PayloadError as exc:
            self.status.rejected += 1
            reason = str(exc)
            state = await self.db.fetchval("reject_gradient", row["id"], row["unit_id"], self.run_id,
                                           row["worker_id"], reason, MAX_UNIT_ATTEMPTS)
            await self._event("rejected", f"gradient from {who} for unit {row['unit_id']} rejected: {reason}")
            if state == "cancelled":
                self._given_up.setdefault(row["step"], set()).add(row["unit_id"])
                await self._event("rejected", f"unit {row['unit_id']} gave bad gradients {MAX_UNIT_ATTEMPTS} times; "
                                              "step goes on without it")
            return
        acc = self.acc.get(row["step"])
        if acc is None:
            acc = self.acc[row["step"]] = StepAccumulator(row["step"])
        # Summing 6M floats is work for the train thread, not the event loop.
        await self._in_thread(acc.add, row["unit_id"], result, row["worker_id"])
        await self.db.execute("consume_gradient", row["id"], row["unit_id"])

    def _decode_gradient(self, blob: bytes, n_samples: int) -> Any:
        tensors, meta = codec.decode_tensors(blob, expected=gradient_spec(self.trainer.g, self.trainer.d))
        if meta.get("n_samples") != n_samples:
            raise PayloadError(f"payload says {meta.get('n_samples')!r} samples, row says {n_samples}")
        if n_samples > self.cfg.unit_size:
            raise PayloadError(f"{n_samples} samples in a unit of {self.cfg.unit_size}")
        metrics = meta.get("metrics") or {}
        if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
            raise PayloadError("metrics must be a map of numbers")
        return split_result(tensors, self.trainer.g, self.trainer.d, n_samples, metrics)

    def _overdue(self) -> bool:
        return time.monotonic() - self._step_opened >= self.opts.step_timeout

    async def _maybe_close_step(self) -> bool:
        acc = self.acc.get(self.step) or StepAccumulator(self.step)
        given_up = len(self._given_up.get(self.step, ()))
        arrived = len(acc.units)
        if arrived + given_up >= self.cfg.units_per_step:
            await self._close_step(acc, partial=given_up > 0)
            return True
        if self._overdue() and arrived >= self.opts.min_units:
            await self._close_step(acc, partial=True)
            return True
        return False

    async def _close_step(self, acc: StepAccumulator | None, *, partial: bool) -> None:
        assert self.db is not None and acc is not None
        closed = self.step
        if acc.n > 0:
            await self._in_thread(lambda: self.trainer.apply(acc.mean_grads(), acc.mean_buffers()))
        self.step = closed + 1
        self.images_seen += acc.n
        weights, optimizer = await self._in_thread(self._encode_state)
        # Heavy write first, in its own transaction; the light one below announces it.
        await self.db.execute("insert_weights", self.run_id, self.step, weights, optimizer)
        metrics = acc.metrics()
        epoch = (self.step * self.cfg.units_per_step * self.cfg.unit_size - 1) // len(self.dataset)
        async with self.db.transaction() as tx:
            if partial:
                await tx.execute("cancel_open_units", self.run_id, closed)
            await tx.execute("retarget_pending_units", self.run_id, self.step)
            await self._queue_units(tx, upto_step=self.step + self.cfg.max_staleness, version=self.step)
            await tx.execute("advance_run", self.run_id, self.step, self.next_seq, acc.n)
            await tx.execute(
                "insert_metrics", self.run_id, self.step, epoch, acc.n, len(acc.units),
                metrics.get("g_loss"), metrics.get("d_loss"), metrics.get("d_x"), metrics.get("d_g_z"), None,
            )
        self._contributors.update(acc.workers)
        self.acc.pop(closed, None)
        self._given_up.pop(closed, None)
        keep_from = max(0, self.step - self.cfg.max_staleness - 1)
        await self.db.execute("prune_weights", self.run_id, keep_from)
        await self.db.execute("prune_optimizer_state", self.run_id, self.step)
        await self.db.execute("prune_units", self.run_id, keep_from - 1)
        self._step_opened = time.monotonic()
        self.status.epoch = epoch
        self.status.history.append({"step": self.step, **metrics})
        if partial:
            await self._event("step", f"step {closed} closed on its deadline with {len(acc.units)} unit(s)")
        position = self.step * self.cfg.units_per_step * self.cfg.unit_size
        log.info("step %d (epoch %d, %.0f%% through it): %d images from %d unit(s), %d worker(s); "
                 "d_loss=%.3f g_loss=%.3f D(x)=%.3f D(G(z))=%.3f",
                 self.step, position // len(self.dataset), 100 * (position % len(self.dataset)) / len(self.dataset),
                 acc.n, len(acc.units), len(acc.workers), metrics.get("d_loss", float("nan")),
                 metrics.get("g_loss", float("nan")), metrics.get("d_x", float("nan")),
                 metrics.get("d_g_z", float("nan")))
        if self.opts.eval_every and self.step % self.opts.eval_every == 0:
            self._schedule_eval()
        if self.step % self.opts.checkpoint_every == 0:
            self._write_outputs()
            await self._write_metrics_plot()
        if self._pusher is not None and self.step % (self.opts.hf_push_every or self.opts.checkpoint_every) == 0:
            self._maybe_push()
        self._publish()

    def _publish(self) -> None:
        self.status.run_id = self.run_id
        self.status.step = self.step
        self.status.images_seen = self.images_seen
        self.status.last_step_at = time.time()
        if self.on_status is not None:
            self.on_status(self.status)

    async def _finish(self) -> None:
        assert self.db is not None
        if self.opts.eval_every:
            self._schedule_eval()
        await self._wait_for_evals()
        self._write_outputs()
        for fut in self._pending_io:
            try:
                await asyncio.wrap_future(fut)
            except OSError as exc:
                raise UserError(f"could not write the checkpoint or samples under {self.opts.out}: {exc}") from exc
        self._pending_io.clear()
        await self._write_metrics_plot()
        if self._pusher is not None:
            if self._push_task is not None:
                await asyncio.gather(self._push_task, return_exceptions=True)
            self._push_not_before = 0.0  # the final state is worth one more try
            self._maybe_push()
            if self._push_task is not None:
                await asyncio.gather(self._push_task, return_exceptions=True)
        await self.db.execute("set_run_status", self.run_id, "done")
        if self.swd:
            first, last = min(self.swd), max(self.swd)
            await self._event("quality", f"SWD x1e3: {self.swd[first]:.1f} at step {first} -> "
                                         f"{self.swd[last]:.1f} at step {last}")
        await self._event("run", f"run {self.run_id} finished at step {self.step}")
        log.info("checkpoint: %s", self.opts.out / CHECKPOINT_NAME)

    # --- Hugging Face Hub -----------------------------------------------------------------

    def _maybe_push(self) -> None:
        """Start a push unless one is running or we are backing off after failures."""
        if self._push_task is not None and not self._push_task.done():
            return
        if time.monotonic() < self._push_not_before:
            return
        info = {"step": self.step, "epoch": self.status.epoch, "images_seen": self.images_seen,
                "workers": len(self._contributors), "swd": self.swd[max(self.swd)] if self.swd else None,
                "config": dataclasses.asdict(self.cfg)}
        self._push_task = asyncio.create_task(self._push(info), name=f"push-{self.step}")

    async def _push(self, info: dict[str, Any]) -> None:
        from ganns_async.hub import PushError, push_backoff

        assert self._pusher is not None
        # The checkpoint for this step is written on the train thread first.
        for fut in list(self._pending_io):
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(fut)
        try:
            url = await asyncio.get_running_loop().run_in_executor(
                self._push_executor, self._pusher.push, self.opts.out, info)
        except (PushError, Exception) as exc:  # noqa: BLE001 - a push must never stop training
            self._push_failures += 1
            delay = push_backoff(self._push_failures)
            if isinstance(exc, PushError) and not exc.transient:
                delay = max(delay, 600.0)
            self._push_not_before = time.monotonic() + delay
            await self._event("hub", f"push of step {info['step']} to {self.opts.hf_repo} failed: {exc}; "
                                     f"next try in {delay:.0f}s or later")
            return
        self._push_failures = 0
        await self._event("hub", f"pushed step {info['step']} to {url}")

    # --- quality -----------------------------------------------------------------------

    def _schedule_eval(self) -> None:
        """SWD of the current generator against real images, off the loop and off the train thread."""
        import copy

        step = self.step
        if step in self._evals or step in self.swd:
            return
        # The snapshot is taken on the train thread, in order: after this step's update,
        # before the next one, and without copying 14 MB on the event loop.
        snapshot = self._executor.submit(lambda: copy.deepcopy(self.trainer.sampler).cpu())
        self._evals[step] = asyncio.create_task(self._eval_and_record(step, snapshot), name=f"eval-{step}")

    async def _eval_and_record(self, step: int, snapshot: concurrent.futures.Future[Any]) -> None:
        from ganns_async.quality import evaluate_generator

        assert self.db is not None
        g = await asyncio.wrap_future(snapshot)
        dataset, n, seed = self.dataset, self.opts.eval_n, self.cfg.seed
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                self._eval_executor, lambda: evaluate_generator(g, dataset, n=n, seed=seed))
        except Exception as exc:  # noqa: BLE001 - a failed evaluation must not stop training
            log.warning("evaluation at step %d failed: %s", step, exc)
            return
        swd = float(result["swd_avg"])
        self.swd[step] = swd
        await self.db.execute("record_swd", self.run_id, step, swd)
        log.info("step %d: SWD x1e3 = %.1f", step, swd)
        self._publish()

    async def _wait_for_evals(self) -> None:
        tasks = list(self._evals.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- outputs -----------------------------------------------------------------------

    def _write_outputs(self) -> None:
        """Queue a checkpoint and a sample grid on the compute thread (after this step's math)."""
        fut = self._executor.submit(self._write_outputs_now, self.step, self.status.epoch, self.images_seen)
        for done in (f for f in self._pending_io if f.done()):
            if done.exception() is not None:
                log.error("writing the checkpoint or samples failed: %s", done.exception())
        self._pending_io = [f for f in self._pending_io if not f.done()] + [fut]

    def _write_outputs_now(self, step: int, epoch: int, images_seen: int) -> None:
        ckpt = write_checkpoint(self.trainer, self.opts.out, step=step, epoch=epoch, images_seen=images_seen,
                                extra={"run_id": int(self.run_id)})
        grid = write_sample_grid(self.trainer, self.opts.out, step=step)
        log.info("wrote %s and %s", ckpt, grid)

    async def _write_metrics_plot(self) -> None:
        from ganns_async.plots import write_metrics_plot

        assert self.db is not None
        rows = [dict(r) for r in await self.db.fetch("run_metrics", self.run_id)]
        await self._in_thread(lambda: write_metrics_plot(rows, self.opts.out / "metrics.png",
                                                         title=f"ganns-async run {self.run_id}"))
