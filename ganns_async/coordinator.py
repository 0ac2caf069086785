"""The coordinator: owns the model, publishes weights and work units, steps Adam.

One asyncio loop. It wakes on ``ganns_gradients`` notifications and lets
:class:`~ganns_async.intake.GradientIntake` fetch, validate and fold the new gradients;
:class:`~ganns_async.steps.StepBook` says when a step may close; closing applies Adam on
the train thread, writes the new weights, and announces them with the next units in one
light transaction. Evaluation, files and Hub pushes have classes of their own
(``evaluation.py``, ``outputs.py``, ``hub_publisher.py``); this module keeps the
lifecycle (start, resume, stop) and the loop.

Lean steps: only the weights are written on a step's critical path. Adam state and G's
moving average go to the database every ``state_every`` steps (and whenever the
coordinator stops); ``--resume`` rewinds to the last saved state and the replayed steps
compute what the lost ones did, because units are deterministic.

Besides notifications, one periodic query runs: a safety sweep every ``sweep_s`` seconds
that returns units with expired leases to pending, pings the run lock's connection, and
picks up any gradient whose notification was lost while the listener reconnected.

Faults: a lost connection anywhere means back off (``retry.Backoff``), reconnect and go on.
Publishing a step is safe to repeat (absolute values, ``ON CONFLICT DO NOTHING``, the
in-memory state moves only after the commit), so it is simply retried. Every reconnect of
the listener (a server restart, a crash) also requeues units whose results the crash took
with the UNLOGGED gradients table. The run lock is kept by a side task that takes it again
after a lost connection, and stops the coordinator if a rival took it meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from ganns_async import codec
from ganns_async.data import ImageDataset
from ganns_async.db import (
    CONNECTION_ERRORS,
    CONTROL_CHANNEL,
    GRADIENTS_CHANNEL,
    Database,
    Listener,
    RunLock,
    lost_connection,
)
from ganns_async.errors import UserError
from ganns_async.evaluation import Evaluator
from ganns_async.intake import PARALLEL_FETCHES, GradientIntake
from ganns_async.migrate import require_migrated
from ganns_async.outputs import CHECKPOINT_NAME, OutputWriter
from ganns_async.retry import Backoff, SideTasks, describe_error, retrying
from ganns_async.steps import CloseDecision, Round, StepBook, idle_notice
from ganns_async.store import CoordinatorStore, NewUnit, StepRecord
from ganns_async.terminal import printable
from ganns_async.training import (
    StepAccumulator,
    TrainConfig,
    Trainer,
    gradient_spec,
    plan_unit,
)
from ganns_async.waiting import wait_event

log = logging.getLogger("ganns_async.coordinator")

APPLICATION_NAME = "ganns-async coordinator"
MASTER_PREFIX = "MASTER."  # fp32 weights inside the optimizer-state blob when workers get bf16
ONLINE_WITHIN_S = 60.0  # a worker seen this recently counts as online (heartbeats every 10 s)


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
    state_every: int = 25  # Adam state + G average to the database every N steps
    eval_every: int = 10  # SWD every N steps (0: never)
    eval_n: int = 512  # images per side for SWD during training
    hf_repo: str | None = None  # push checkpoint, samples and a model card here
    hf_push_every: int | None = None  # steps between pushes [default: checkpoint_every]
    hf_checkpoint_every: int = 100  # steps between pushes that include the training checkpoint
    hf_private: bool = False
    sweep_s: float = 15.0
    spot_check: float = 0.05  # share of results checked by a copy (plus each worker's first ones)
    tensorboard: Path | None = None  # also write the metrics rows as TensorBoard scalars here


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
        self.ready = asyncio.Event()  # test signal: run published, listening
        self.db: Database | None = None
        self.listener: Listener | None = None
        self.run_id: int | None = None
        # Adam, encoding, summing and file writing run here, in order.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        self.outputs = OutputWriter(opts.out, self._executor)
        self.evaluator: Evaluator | None = None
        self.publisher: Any = None  # HubPublisher when --hf-repo is given
        self.tensorboard: Any = None  # TensorBoardLog when --tensorboard is given
        self._lock: RunLock | None = None
        self.side = SideTasks(log)  # listener, run lock: the coordinator stops if one dies
        self._check_results = False  # set on every reconnect: a crash may have emptied the gradients table
        self._vacuum_task: asyncio.Task[None] | None = None
        self.intake: GradientIntake | None = None
        self._control_changed = False
        self._contributors: set[int] = set()
        self._idle_said = False
        self.trainer_version = -1  # the version the in-memory weights are (runs ahead of the database mid-publish)
        self.state_version = -1  # the newest version whose Adam state is in the database

    @property
    def step(self) -> int:
        return self.book.step

    def _notify(self, channel: str, payload: str) -> None:
        if channel == CONTROL_CHANNEL:
            self._control_changed = True
        self.wake.set()

    def _reconnected(self) -> None:
        """The listener (re)connected: notifications may have been lost, and if the server
        crashed, so were the stored results of units marked done."""
        self._check_results = True
        self._control_changed = True
        self.wake.set()

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _event(self, kind: str, message: str) -> None:
        log.info("%s: %s", kind, printable(message, 300))  # may quote a student's words
        await self.store.event(self.run_id, kind, message)

    async def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn`` (safe to repeat) until the database answers: one policy for the whole process."""
        return await retrying(fn, log=log, what=f"{what}: database unavailable", retry_if=lost_connection)

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> int:
        opts = self.opts
        from ganns_async.hub import resolve_data

        local = await asyncio.to_thread(resolve_data, opts.data)
        self.dataset = await asyncio.to_thread(ImageDataset.open, local)
        if opts.hf_repo:
            from ganns_async.hub_publisher import HubPublisher

            self.publisher = HubPublisher(opts.hf_repo, private=opts.hf_private, out=opts.out,
                                          checkpoint_every=opts.hf_checkpoint_every,
                                          event=lambda msg: self._retry("logging", lambda: self._event("hub", msg)),
                                          outputs_written=self.outputs.wait)
            self.publisher.check_token()
        opts.out.mkdir(parents=True, exist_ok=True)
        self.db = await Database.open(opts.db_url, max_size=PARALLEL_FETCHES + 2, application_name=APPLICATION_NAME)
        self.store = CoordinatorStore(self.db)
        finished = False
        try:
            # The first connection above fails fast: a wrong URL or login is the operator's to
            # fix. From here on the server was reachable, so losing it means back off and go on,
            # during start-up as after it (every start-up step is safe to repeat).
            await self._retry("checking the schema", lambda: require_migrated(self.db))
            self.listener = Listener(opts.db_url, [GRADIENTS_CHANNEL, CONTROL_CHANNEL], self._notify,
                                     self._reconnected, application_name=APPLICATION_NAME)
            self.side.watch(await self._retry("listening", self.listener.start))
            if opts.resume:
                await self._retry("resuming the run", self._resume)
            else:
                await self._start_new()
            assert self.run_id is not None
            if opts.tensorboard is not None:
                from ganns_async.tensorboard_log import TensorBoardLog

                self.tensorboard = TensorBoardLog(opts.tensorboard, self.run_id,
                                                  resume_step=self.step if opts.resume else None)
            # The largest blob a worker may store (the server refuses bigger ones before the
            # coordinator ever reads them), and how long it may hold a unit.
            budget = codec.spec_budget(gradient_spec(self.trainer.g, self.trainer.d))
            run_id = self.run_id
            await self._retry("setting the run's limits", lambda: self.store.set_limits(
                run_id, max_payload=budget + budget // 64 + 4096, max_unit_s=opts.step_timeout))
            self.intake = GradientIntake(self.store, self.book, run_id=self.run_id, trainer=self.trainer,
                                         config=self.cfg, fold_thread=self._executor,
                                         event=self._event, spot_check=opts.spot_check)
            self.evaluator = Evaluator(self.dataset, n=opts.eval_n, seed=self.cfg.seed, train=self._executor,
                                       record=self._record_swd)
            if opts.eval_every and not opts.resume:
                self.evaluator.schedule(0, self.trainer)  # the step-0 baseline later SWD is compared with
            self.ready.set()
            finished = await self.side.guard(self._loop())
        finally:
            await self._shutdown(finished)
        return 0

    async def _shutdown(self, finished: bool) -> None:
        await self.outputs.wait()
        rival = self._lock is not None and self._lock.lost_to_rival
        if self.run_id is not None and not finished and self.db is not None and not rival:
            # Interrupted: save Adam state (so --resume need not replay) and pause the run.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._save_state(), 30)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.store.pause(self.run_id), 5)
                await asyncio.wait_for(self.store.event(
                    self.run_id, "coordinator", f"coordinator stopped at step {self.step}; continue with --resume"), 5)
                log.info("run %s paused at step %s; continue with `ganns-async coordinator --resume`",
                         self.run_id, self.step)
        if self._vacuum_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._vacuum_task, 10)
        await self.side.cancel_all()
        if self.listener is not None:
            await self.listener.close()
        if self._lock is not None:
            await self._lock.close()
        if self.db is not None:
            await self.db.close()
        if self.evaluator is not None:
            self.evaluator.close()
        if self.publisher is not None:
            self.publisher.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.intake is not None:
            self.intake.close()
        self._executor.shutdown(wait=True)
        self.dataset.close()

    def _new_book(self, step: int, next_seq: int) -> StepBook:
        return StepBook(units_per_step=self.cfg.units_per_step, max_staleness=self.cfg.max_staleness,
                        step_timeout=self.opts.step_timeout, min_units=self.opts.min_units,
                        step=step, opened_at=time.monotonic(), max_steps=self.opts.max_steps, next_seq=next_seq)

    def _plan(self, rounds: list[Round], version: int) -> list[NewUnit]:
        out = []
        for r in rounds:
            for seq in range(r.start, r.end):
                p = plan_unit(self.cfg, len(self.dataset), seq, r.step)
                out.append(NewUnit(p.seq, p.step, version, p.epoch, p.indices, p.noise_seed))
        return out

    async def _rounds_to_queue(self, step: int) -> list[Round]:
        """The rounds to plan now; with an auto width, one unit per worker online."""
        online = 0
        if self.cfg.auto_width:
            online = await self.store.online_workers_any(ONLINE_WITHIN_S)
        return self.book.rounds_to_queue(online, step)

    def _describe(self) -> str:
        cfg = self.cfg
        width = "one unit per online worker" if cfg.auto_width else f"{cfg.units_per_step} units"
        if not cfg.local:
            return f"{width} x {cfg.unit_size} images per step (exact mode: averaged gradients, Adam)"
        outer = "FedAvg" if cfg.outer_lr == 1.0 and cfg.outer_momentum == 0.0 else (
            f"outer lr {cfg.outer_lr:g}, momentum {cfg.outer_momentum:g}")
        return (f"{width} per round, each {cfg.local_steps} local steps x {cfg.unit_size} images "
                f"({cfg.images_per_unit} images per unit; {outer})")

    async def _start_new(self) -> None:
        cfg = self.cfg = self.opts.config
        try:
            cfg.check()
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.trainer = Trainer(cfg)
        self.trainer_version = 0
        self.images_seen = 0
        self.book = self._new_book(0, 0)
        weights, optimizer = await self._in_thread(self._encode, 0, True, 0, 0)
        config_json, fingerprint = cfg.to_json(), self.dataset.fingerprint
        newest = await self._retry("starting a run", self.store.newest_run_id)
        tried = False

        async def create() -> int:
            # Safe to repeat: a retry first looks for the run that a lost reply created.
            nonlocal tried
            if tried and (mine := await self.store.run_created_since(newest, config_json, fingerprint)):
                return mine.id
            tried = True
            old = await self.store.stop_active_run()
            if old is not None:
                log.info("run %s was still active: marked stopped (use --resume to continue a run)", old)
            return (await self.store.create_run(config_json, fingerprint, len(self.dataset))).id

        run_id = self.run_id = await self._retry("creating the run", create)
        await self._take_lock(run_id)
        await self._retry("writing the first weights", lambda: self.store.write_weights(run_id, 0, weights, optimizer))
        self.state_version = 0

        async def queue() -> list[Round]:
            rounds = await self._rounds_to_queue(0)
            await self.store.reopen(run_id, step=0, units=self._plan(rounds, 0), next_seq=rounds[-1].end,
                                    images_seen=0)
            return rounds

        self.book.queued(await self._retry("queueing the first units", queue))
        await self._retry("logging", lambda: self._event(
            "run", f"run {run_id} started: {len(self.dataset)} images; {self._describe()}"))
        self._publish()

    async def _resume(self) -> None:
        """Safe to repeat (its writes set absolute positions and insert units ON CONFLICT DO
        NOTHING): start-up retries it whole after a lost connection."""
        run = await self.store.latest_run()
        if run is None:
            raise UserError("nothing to resume: the database holds no run (start one without --resume)")
        if run.status == "done":
            raise UserError(f"run {run.id} already finished at step {run.step}; start a new run without --resume")
        if run.dataset_fingerprint != self.dataset.fingerprint:
            raise UserError(
                f"cannot resume run {run.id}: it trained on a different dataset "
                f"(fingerprint {run.dataset_fingerprint}, --data has {self.dataset.fingerprint})"
            )
        await self._take_lock(run.id)
        run = await self.store.get_run(run.id)  # re-read now that it is ours
        assert run is not None
        self.run_id = run.id
        self.cfg = TrainConfig.from_json(run.config)
        self.trainer = Trainer(self.cfg)
        saved = await self.store.latest_state(run.id, run.step)
        if saved is None:
            raise UserError(f"cannot resume run {run.id}: no weights up to version {run.step} are in the database")
        version, payload, optimizer = saved
        meta = await self._in_thread(self._load_state, payload, optimizer)
        self.trainer_version = self.state_version = version
        if version < run.step and (optimizer is None or "images_seen" not in meta):
            raise UserError(f"cannot resume run {run.id}: no optimizer state saved at or before step {run.step}")
        await self.store.delete_weights_after(run.id, version)
        if version < run.step:
            # Adam state is saved every --state-every steps: go back to the last save and
            # compute the steps since again (the same units; with --max-staleness 0 the
            # same result, bit for bit).
            self.images_seen = int(meta["images_seen"])
            if "round_start" in meta:
                start = int(meta["round_start"])
            elif not self.cfg.auto_width:
                start = version * self.cfg.units_per_step  # saved before rounds were recorded
            else:
                raise UserError(f"cannot resume run {run.id}: its saved state does not say where step {version} "
                                "starts in the unit schedule")
            self.book = self._new_book(version, start)
            rounds = await self._rounds_to_queue(version)
            await self.store.rewind(run.id, version, self.images_seen, self._plan(rounds, version),
                                     rounds[-1].end if rounds else start)
            self.book.queued(rounds)
            await self._event("run", f"run {run.id} resumed at step {version}, the last saved state; "
                                     f"replaying {run.step - version} step(s) up to {run.step}")
        else:
            self.images_seen = run.images_seen
            self.book = self._new_book(version, run.next_seq)
            self.book.queued(await self.store.queued_rounds(run.id, version))
            await self.store.delete_replicas(run.id)  # what they were to check was in the lost memory
            requeued = await self.store.requeue_lost_units(run.id, version)
            rounds = await self._rounds_to_queue(version)
            await self.store.reopen(run.id, step=version, units=self._plan(rounds, version),
                                    next_seq=rounds[-1].end if rounds else self.book.next_seq,
                                    images_seen=self.images_seen)
            self.book.queued(rounds)
            await self._event("run", f"run {run.id} resumed at step {version} ({requeued} unit(s) queued again)")
        self._publish()

    async def _take_lock(self, run_id: int) -> None:
        """One coordinator per run; the lock is kept (taken again after a lost connection)."""
        if self._lock is not None:
            return  # a start-up step is being repeated; the lock is ours and kept
        lock = RunLock(self.opts.db_url, run_id, application_name=APPLICATION_NAME)
        if await self._retry("taking the run lock", lock.acquire):
            self._lock = lock
        else:
            raise UserError(f"run {run_id} is being coordinated by another process (it holds the run's lock); "
                            "stop that coordinator first")
        self.side.start(self._lock.keep(), "run-lock")

    def _load_state(self, payload: bytes, optimizer: bytes | None) -> dict[str, Any]:
        spec = codec.tensor_spec(self.trainer.state())
        tensors, _ = codec.decode_tensors(payload, expected=spec)
        self.trainer.load_state(tensors)
        if optimizer is None:
            return {}
        opt_tensors, meta = codec.decode_tensors(optimizer)
        master = {k[len(MASTER_PREFIX):]: v for k, v in opt_tensors.items() if k.startswith(MASTER_PREFIX)}
        if master:
            if codec.tensor_spec(master) != spec:
                raise UserError("the saved master weights do not fit the model; the state blob is damaged")
            self.trainer.load_state(master)  # the fp32 weights behind a bf16 broadcast
        self.trainer.load_optimizer_tensors(opt_tensors, meta)
        return dict(meta)

    def _encode(self, version: int, with_state: bool, images_seen: int = 0,
                round_start: int = 0) -> tuple[bytes, bytes | None]:
        """Weights of ``version`` (every step) and, when due, optimizer state and G's average."""
        state = self.trainer.state()
        weights = codec.encode_tensors(state, meta={"step": version}, float_dtype=self.cfg.broadcast_dtype)
        if not with_state:
            return weights, None
        opt_tensors, meta = self.trainer.optimizer_tensors()
        if self.cfg.broadcast_dtype != "fp32":
            # Workers get rounded weights; --resume needs the exact ones.
            opt_tensors.update({MASTER_PREFIX + k: v for k, v in state.items()})
        meta["images_seen"] = images_seen  # what a rewind to this version restores
        meta["round_start"] = round_start  # where its round starts in the unit schedule
        return weights, codec.encode_tensors(opt_tensors, meta=meta)

    def _state_of(self, version: int, images_seen: int, round_start: int) -> bytes | None:
        """On the train thread, after any Adam step still queued there: the optimizer state
        of ``version``, or None when the weights have already moved past it."""
        if self.trainer_version != version:
            return None
        return self._encode(version, True, images_seen, round_start)[1]

    async def _save_state(self) -> None:
        """Adam state for the published version, if it is not saved yet (on stop)."""
        if self.state_version == self.step:
            return
        # Checked on the train thread: a Ctrl-C can land while Adam is applying the next step.
        optimizer = await self._in_thread(self._state_of, self.step, self.images_seen,
                                          self.book.round_start(self.step))
        if optimizer is None:
            return
        assert self.run_id is not None
        await self.store.save_state(self.run_id, self.step, optimizer)
        self.state_version = self.step

    # --- the loop ----------------------------------------------------------------------

    async def _loop(self) -> bool:
        """Returns True when the run ended (max_steps reached or stopped by the operator)."""
        assert self.intake is not None
        next_sweep = time.monotonic() + self.opts.sweep_s
        backoff = Backoff()
        while True:
            if self.book.finished():
                await self._finish()
                return True
            self.wake.clear()
            try:
                if await self._stopped_by_operator():
                    return True
                if self._check_results:
                    await self._requeue_lost_results()
                await self.intake.drain()
                now = time.monotonic()
                if self.book.overdue(now):
                    await self.intake.give_up_held(self.book.step)  # no copy came to check them
                if now >= next_sweep:
                    await self._sweep()
                    next_sweep = now + self.opts.sweep_s
                decision = self.book.ready(time.monotonic())
                if decision is not None:
                    await self._close_step(decision)
                    backoff.reset()
                    continue
            except CONNECTION_ERRORS as exc:
                # Reading and folding gradients is safe to repeat (each unit counts once), and
                # so is everything before a step's commit (see _close_step).
                self._check_results = True
                await backoff.wait(log, "database unavailable", exc)
                continue
            backoff.reset()
            now = time.monotonic()
            timeout = max(0.05, self.book.wake_at(now, next_sweep) - now)
            await wait_event(self.wake, timeout)

    async def _stopped_by_operator(self) -> bool:
        """`ganns-async control stop` (or a psql UPDATE) ends the run; pause just idles the workers."""
        if not self._control_changed:
            return False
        self._control_changed = False
        assert self.run_id is not None
        run = await self.store.get_run(self.run_id)
        if run is None or run.status != "stopped":
            return False
        self._queue_outputs()
        await self.outputs.wait()
        await self._save_state()
        await self._event("run", f"run {self.run_id} stopped by the operator at step {self.step}")
        return True

    async def _requeue_lost_results(self) -> None:
        """Units marked done whose results are gone (a server crash empties the UNLOGGED
        gradients table) are computed again, at once."""
        assert self.run_id is not None
        lost = await self.store.requeue_lost_results(self.run_id, self.book.step)
        self._check_results = False
        if lost:
            self.status.requeued += len(lost)
            await self._event("requeue", f"{len(lost)} result(s) were lost with the database server's restart "
                                         f"(units {', '.join(map(str, lost[:8]))}{'...' if len(lost) > 8 else ''}); "
                                         "computing them again")

    async def _sweep(self) -> None:
        """The safety sweep: expired leases back to pending, the run lock's connection pinged;
        lost notifications are caught up by the next drain."""
        assert self.run_id is not None
        if self._lock is not None:
            await self._lock.check()
        for unit_id, step, who in await self.store.requeue_expired_leases(self.run_id):
            self.status.requeued += 1
            await self._event("requeue", f"unit {unit_id} (step {step}) lease expired on "
                                         f"{who or 'a departed worker'}; back to pending")

    # --- closing a step --------------------------------------------------------------

    def _advance(self, acc: StepAccumulator, version: int, with_state: bool, images_seen: int,
                 round_start: int) -> tuple[bytes, bytes | None]:
        """On the train thread: one optimizer step (once, even if publishing is retried), then encode."""
        if self.trainer_version == version - 1:
            self.trainer.update(acc)
            bad = self.trainer.non_finite()
            if bad is not None:
                raise UserError(f"step {version} made {bad} non-finite, so it is not published; "
                                "`coordinator --resume` goes back to the last saved state")
            self.trainer_version = version
        return self._encode(version, with_state, images_seen, round_start)

    def _last(self, version: int) -> bool:
        """Version ``version`` ends the run (``--max-steps``)."""
        return self.opts.max_steps is not None and version >= self.opts.max_steps

    def _state_due(self, version: int) -> bool:
        return self._last(version) or version % self.opts.state_every == 0

    async def _close_step(self, decision: CloseDecision) -> None:
        """Apply the step, write and announce the new version, then move on in memory.

        Until the announcement commits, a lost connection is simply retried: the Adam step
        is applied once (``_advance`` knows which version the weights hold), the encoded
        blobs, the rounds and the sum stay as they were, and every statement of the
        announcement is safe to repeat. No gradient is drained meanwhile, so the sum that
        is announced is the sum that is taken. After the commit, housekeeping (pruning,
        events, files) never undoes the step: a failure there is logged and tried again
        at the next step.
        """
        assert self.run_id is not None and self.intake is not None
        closed = decision.step
        version = closed + 1
        acc = self.intake.peek(closed)
        images_after = self.images_seen + acc.n
        with_state = self._state_due(version)
        rounds = await self._rounds_to_queue(version)
        round_start = self.book.round_start(version, rounds)
        t0 = time.perf_counter()
        weights, optimizer = await self._in_thread(self._advance, acc, version, with_state, images_after, round_start)
        t1 = time.perf_counter()
        metrics = acc.metrics()
        position = round_start * self.cfg.images_per_unit  # images of the schedule behind this version
        epoch = max(0, position - 1) // len(self.dataset)
        next_seq = rounds[-1].end if rounds else self.book.next_seq
        units = self._plan(rounds, version)
        record = StepRecord(version, epoch, acc.n, len(acc.units), metrics)
        timings: list[float] = []

        async def announce() -> None:
            assert self.run_id is not None
            if self._vacuum_task is not None and not self._vacuum_task.done():
                # The space the last step freed becomes reusable when its vacuum ends; writing
                # before that would grow the file instead. Usually done already (20-75 ms); a
                # vacuum waiting to trim the file's end can take seconds, and is not waited for.
                await asyncio.wait({self._vacuum_task}, timeout=0.5)
            ta = time.perf_counter()
            # The heavy write first, in its own transaction; the light one below announces it.
            await self.store.write_weights(self.run_id, version, weights, optimizer)
            tb = time.perf_counter()
            await self.store.publish_step(
                self.run_id, version=version, partial_step=closed if decision.partial else None,
                units=units, next_seq=next_seq, images_seen=images_after, record=record)
            timings[:] = [tb - ta, time.perf_counter() - tb]

        await self._retry(f"publishing step {version}", announce)
        # Committed: only now does the in-memory state move on.
        self.book.queued(rounds)
        self.images_seen = images_after
        if with_state:
            self.state_version = version
        self.book.close(time.monotonic())
        self.intake.take(closed)
        self._contributors.update(acc.workers)
        self.status.epoch = epoch
        self.status.history.append({"step": version, **metrics})
        if self.tensorboard is not None:  # the metrics row just committed, as scalars
            self.tensorboard.step(version, metrics, images=acc.n, units=len(acc.units), epoch=epoch)
        log.info("step %d (epoch %d, %.0f%% through it): %d images from %d unit(s), %d worker(s); "
                 "d_loss=%.3f g_loss=%.3f D(x)=%.3f D(G(z))=%.3f",
                 version, position // len(self.dataset), 100 * (position % len(self.dataset)) / len(self.dataset),
                 acc.n, len(acc.units), len(acc.workers), metrics.get("d_loss", float("nan")),
                 metrics.get("g_loss", float("nan")), metrics.get("d_x", float("nan")),
                 metrics.get("d_g_z", float("nan")))
        log.debug("step %d timings: adam+encode %.3fs, weights write %.3fs, announce %.3fs%s",
                  version, t1 - t0, *timings, " (with state)" if with_state else "")
        if self.opts.eval_every and version % self.opts.eval_every == 0 and self.evaluator is not None:
            self.evaluator.schedule(version, self.trainer)
        # The run's last step writes and pushes nothing here: _finish does, right after, with
        # the final SWD in the card (writing the checkpoint twice cost a second or two).
        last = self._last(version)
        push = (not last and self.publisher is not None
                and version % (self.opts.hf_push_every or self.opts.checkpoint_every) == 0)
        if not last and (version % self.opts.checkpoint_every == 0 or self.outputs.failing is not None or push):
            self._queue_outputs()  # every step while writing fails, until it works again
        if push and self.publisher is not None:
            self.publisher.maybe_push(self._card_info())  # waits for the files just queued
        self._publish()
        try:
            await self._housekeeping(version, decision, acc)
        except CONNECTION_ERRORS as exc:
            log.warning("after publishing step %d: %s; its housekeeping runs again with the next step",
                        version, describe_error(exc))

    async def _housekeeping(self, version: int, decision: CloseDecision, acc: StepAccumulator) -> None:
        """After a step's commit: drop what nobody needs any more, say what happened."""
        assert self.run_id is not None
        # A unit computed on a version older than version - K is stale whatever it feeds.
        await self.store.prune(self.run_id, keep_versions_from=max(0, version - self.cfg.max_staleness),
                               keep_state_version=self.state_version)
        self._vacuum()
        if decision.partial:
            why = "on its deadline" if decision.reason == "deadline" else "without its given-up unit(s)"
            await self._event("step", f"step {decision.step} closed {why} with {len(acc.units)} unit(s)")
        news = self.outputs.news()
        if news is not None:
            await self._event("files", news)
        await self._check_idle()
        if version % self.opts.checkpoint_every == 0 and not self._last(version):  # _finish draws the last
            await self.outputs.metrics_plot(await self.store.run_metrics(self.run_id), self.run_id)

    def _vacuum(self) -> None:
        """Return the space of the blobs just pruned, off the step's critical path."""
        if self._vacuum_task is not None and not self._vacuum_task.done():
            return  # the last one is still at it; the next step asks again
        self._vacuum_task = asyncio.create_task(self._vacuum_now(), name="vacuum")

    async def _vacuum_now(self) -> None:
        try:
            await self.store.vacuum_blobs()
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            log.debug("vacuum skipped: %s", exc)

    async def _check_idle(self) -> None:
        """Say once when more workers are online than there are units to share."""
        if self._idle_said or self.run_id is None or self.cfg.auto_width:
            return  # with an auto width, everyone online gets a unit of the next round
        online = await self.store.online_workers(self.run_id, ONLINE_WITHIN_S)
        notice = idle_notice(online, self.book.capacity())
        if notice is not None:
            self._idle_said = True
            await self._event("idle", notice)

    def _publish(self) -> None:
        if self.intake is not None:
            self.status.stale_dropped = self.intake.stale_dropped
            self.status.rejected = self.intake.rejected
        self.status.run_id = self.run_id
        self.status.step = self.step
        self.status.images_seen = self.images_seen
        self.status.last_step_at = time.time()
        if self.on_status is not None:
            self.on_status(self.status)

    async def _finish(self) -> None:
        assert self.run_id is not None and self.evaluator is not None
        if self.opts.eval_every:
            self.evaluator.schedule(self.step, self.trainer)
        await self.evaluator.wait()
        run_id = self.run_id
        self._queue_outputs()
        await self.outputs.wait(strict=True)
        rows = await self._retry("reading the metrics", lambda: self.store.run_metrics(run_id))
        await self.outputs.metrics_plot(rows, run_id)
        if self.publisher is not None:
            await self.publisher.final_push(self._card_info())
        await self._retry("saving the optimizer state", self._save_state)
        await self._retry("marking the run done", lambda: self.store.set_status(run_id, "done"))
        summary = self.evaluator.summary()
        if summary:
            await self._retry("logging", lambda: self._event("quality", summary))
        await self._retry("logging", lambda: self._event("run", f"run {run_id} finished at step {self.step}"))
        log.info("checkpoint: %s", self.opts.out / CHECKPOINT_NAME)

    # --- outputs, quality, the Hub -------------------------------------------------------

    def _queue_outputs(self) -> None:
        assert self.run_id is not None
        self.outputs.queue(self.trainer, step=self.step, epoch=self.status.epoch, images_seen=self.images_seen,
                           run_id=self.run_id, card_info=self._card_info())

    async def _record_swd(self, step: int, swd: float) -> None:
        run_id = self.run_id
        assert run_id is not None
        await self._retry(f"recording SWD of step {step}", lambda: self.store.record_swd(run_id, step, swd))
        if self.tensorboard is not None:
            self.tensorboard.swd(step, swd)
        self._publish()

    @property
    def swd(self) -> dict[int, float]:
        return self.evaluator.swd if self.evaluator is not None else {}

    def _card_info(self) -> dict[str, Any]:
        """What the model card says about the run now (see ganns_async.model_card)."""
        return {"step": self.step, "epoch": self.status.epoch, "images_seen": self.images_seen,
                "workers": len(self._contributors),
                "swd": self.evaluator.latest() if self.evaluator is not None else None,
                "config": dataclasses.asdict(self.cfg),
                "repo_id": self.opts.hf_repo or (self.opts.out / "generator").as_posix()}
