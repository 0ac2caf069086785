"""Typed database access for the coordinator and the worker.

The protocol's processes call methods here, never query names: each method is one
step of the protocol (claim a unit, store a gradient, publish a version...), and its
SQL lives in ``queries.sql`` under the same name. Rows come back as small frozen
dataclasses, so the rest of the code never indexes an asyncpg record by string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ganns_async.db import SHORT_TIMEOUT_S, Database, Tx
from ganns_async.steps import Round
from ganns_async.terminal import printable

if TYPE_CHECKING:  # hardware imports torch; the coordinator's store needs none of it
    from ganns_async.hardware import Resources


@dataclass(frozen=True)
class RunRow:
    id: int
    status: str
    config: str
    dataset_fingerprint: str
    dataset_size: int
    step: int
    next_seq: int
    images_seen: int

    @classmethod
    def of(cls, row: Any) -> "RunRow":
        return cls(int(row["id"]), row["status"], row["config"], row["dataset_fingerprint"],
                   int(row["dataset_size"]), int(row["step"]), int(row["next_seq"]), int(row["images_seen"]))


@dataclass(frozen=True)
class UnitRow:
    """A claimed work unit, as a worker sees it."""

    id: int
    run_id: int
    seq: int
    step: int
    version: int
    epoch: int
    indices: tuple[int, ...]
    noise_seed: int
    weights_at: datetime | None = None  # when its version was published (None: not there)


@dataclass(frozen=True)
class GradientRow:
    """A stored gradient's header (the blob is fetched separately, in parallel)."""

    id: int
    unit_id: int
    worker_id: int | None
    worker_name: str | None
    version: int
    n_samples: int
    step: int
    unit_state: str
    replica_of: int | None = None  # this unit is a copy checking that unit's result

    @property
    def who(self) -> str:
        """The worker's name as logs and events may show it (it is typed by a student)."""
        return printable(self.worker_name, 64) if self.worker_name else f"worker {self.worker_id}"


@dataclass(frozen=True)
class NewUnit:
    seq: int
    step: int
    version: int
    epoch: int
    indices: Sequence[int]
    noise_seed: int


@dataclass(frozen=True)
class StepRecord:
    """What closing a step writes besides the weights: the curve's next point."""

    step: int
    epoch: int
    images: int
    units: int
    metrics: dict[str, float]


def _units_json(units: Iterable[NewUnit]) -> str:
    return json.dumps([{"seq": u.seq, "step": u.step, "version": u.version, "epoch": u.epoch,
                        "indices": list(u.indices), "noise_seed": u.noise_seed} for u in units])


class CoordinatorStore:
    """Everything the coordinator reads and writes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # runs
    async def latest_run(self) -> RunRow | None:
        row = await self.db.fetchrow("latest_run")
        return RunRow.of(row) if row else None

    async def get_run(self, run_id: int) -> RunRow | None:
        row = await self.db.fetchrow("get_run", run_id)
        return RunRow.of(row) if row else None

    async def stop_active_run(self) -> int | None:
        """Mark a still-active run stopped (a new run replaces it); returns its id."""
        row = await self.db.fetchrow("active_run")
        if row is None:
            return None
        await self.db.execute("set_run_status", row["id"], "stopped")
        return int(row["id"])

    async def newest_run_id(self) -> int:
        """The highest run id so far (0 when there is none)."""
        return int(await self.db.fetchval("newest_run_id"))

    async def run_created_since(self, after_id: int, config_json: str, fingerprint: str) -> RunRow | None:
        """A run newer than ``after_id`` with this config and data, still at step 0: the one
        our own create_run made when its reply was lost."""
        row = await self.db.fetchrow("run_created_since", after_id, config_json, fingerprint)
        return RunRow.of(row) if row is not None else None

    async def create_run(self, config_json: str, fingerprint: str, size: int) -> RunRow:
        row = await self.db.fetchrow("create_run", config_json, fingerprint, size)
        assert row is not None
        return RunRow.of(row)

    async def set_limits(self, run_id: int, *, max_payload: int, max_unit_s: float) -> None:
        """What the server enforces on workers for this run (sql/003_roles.sql)."""
        await self.db.execute("set_run_limits", run_id, max_payload, max_unit_s)

    async def cancelled_units(self, run_id: int, from_step: int) -> list[tuple[int, int, int, int | None]]:
        """``(unit id, step, seq, replica_of)`` of cancelled units of open steps: the server
        cancels a unit that a trusted worker reported unusable, and the round must stop
        waiting for it (or for the result a cancelled copy was to check)."""
        return [(int(r["id"]), int(r["step"]), int(r["seq"]), r["replica_of"])
                for r in await self.db.fetch("cancelled_units", run_id, from_step)]

    async def set_status(self, run_id: int, status: str) -> None:
        await self.db.execute("set_run_status", run_id, status)

    async def pause(self, run_id: int) -> None:
        await self.db.execute("pause_run", run_id)

    # weights and optimizer state
    async def write_weights(self, run_id: int, version: int, weights: bytes, optimizer: bytes | None) -> None:
        """The heavy write of a version, in a transaction of its own; announced later."""
        await self.db.execute("insert_weights", run_id, version, weights, optimizer)

    async def save_state(self, run_id: int, version: int, optimizer: bytes) -> None:
        await self.db.execute("save_state", run_id, version, optimizer)

    async def latest_state(self, run_id: int, upto: int) -> tuple[int, bytes, bytes | None] | None:
        """The newest version <= ``upto`` that has optimizer state saved (or version
        ``upto`` itself without state, for runs that never saved any)."""
        row = await self.db.fetchrow("latest_saved_state", run_id, upto)
        if row is None:
            return None
        return int(row["version"]), row["payload"], row["optimizer"]

    # units
    async def insert_units(self, tx: Tx, run_id: int, units: Sequence[NewUnit]) -> None:
        if units:
            await tx.execute("insert_units", run_id, _units_json(units))

    async def delete_weights_after(self, run_id: int, version: int) -> None:
        await self.db.execute("delete_weights_after", run_id, version)

    async def reopen(self, run_id: int, *, step: int, units: Sequence[NewUnit], next_seq: int, images_seen: int) -> None:
        """(Re)start a run at version ``step``: queue its missing units and mark it running."""
        async with self.db.transaction() as tx:
            await self.insert_units(tx, run_id, units)
            await tx.execute("set_run_position", run_id, step, next_seq, images_seen)
            await tx.execute("set_run_status", run_id, "running")

    async def requeue_lost_units(self, run_id: int, from_step: int) -> int:
        return len(await self.db.fetch("requeue_lost_units", run_id, from_step))

    async def requeue_lost_results(self, run_id: int, from_step: int) -> list[int]:
        """Units of open steps marked done whose results a server crash took: back to pending."""
        return [int(r["id"]) for r in await self.db.fetch("requeue_lost_results", run_id, from_step)]

    async def rewind(self, run_id: int, step: int, images_seen: int, units: Sequence[NewUnit], next_seq: int) -> None:
        """Go back to version ``step`` (the last one with optimizer state): later versions
        and every unit from ``step`` on are dropped and planned again. Units are
        deterministic, so the replayed steps compute what the lost ones did."""
        async with self.db.transaction() as tx:
            await tx.execute("delete_weights_after", run_id, step)
            await tx.execute("delete_units_from", run_id, step)
            await self.insert_units(tx, run_id, units)
            await tx.execute("set_run_position", run_id, step, next_seq, images_seen)
            await tx.execute("set_run_status", run_id, "running")

    async def requeue_expired_leases(self, run_id: int) -> list[tuple[int, int, str | None]]:
        rows = await self.db.fetch("requeue_expired_leases", run_id)
        return [(int(r["id"]), int(r["step"]), printable(r["worker_name"], 64) if r["worker_name"] else None)
                for r in rows]

    async def cancel_open_units(self, run_id: int, step: int) -> None:
        await self.db.execute("cancel_open_units", run_id, step)

    # gradients
    async def pending_gradients(self, run_id: int) -> list[GradientRow]:
        rows = await self.db.fetch("pending_gradients", run_id)
        return [GradientRow(int(r["id"]), int(r["unit_id"]), r["worker_id"], r["worker_name"], int(r["version"]),
                            int(r["n_samples"]), int(r["step"]), r["unit_state"], r["replica_of"]) for r in rows]

    async def gradient_payload(self, gradient_id: int) -> bytes | None:
        return await self.db.fetchval("gradient_payload", gradient_id)

    async def consume_gradient(self, g: GradientRow) -> None:
        await self.db.execute("consume_gradient", g.id, g.unit_id)

    async def drop_gradient(self, g: GradientRow) -> None:
        await self.db.execute("drop_gradient", g.id, g.unit_id)

    async def reject_gradient(self, run_id: int, g: GradientRow, reason: str, max_attempts: int) -> str | None:
        """Returns the unit's new state: 'pending' (recompute) or 'cancelled' (given up)."""
        return await self.db.fetchval("reject_gradient", g.id, g.unit_id, run_id, g.worker_id, reason, max_attempts)

    async def replicate(self, g: GradientRow, unit_id: int) -> int:
        """Take ``g`` out of the table (its result is held in memory) and queue a copy of
        ``unit_id`` for another worker, atomically; returns the copy's id."""
        async with self.db.transaction() as tx:
            replica = int(await tx.fetchval("insert_replica", unit_id))
            await tx.execute("consume_gradient", g.id, g.unit_id)
        return replica

    async def logins_online(self, run_id: int, within_s: float) -> int:
        return int(await self.db.fetchval("logins_online", run_id, within_s))

    async def delete_replicas(self, run_id: int) -> None:
        await self.db.execute("delete_replicas", run_id)

    async def quarantine_now(self, worker_id: int, reason: str) -> None:
        await self.db.execute("quarantine_now", worker_id, reason)

    async def quarantine(self, worker_id: int, after_refused: int, reason: str) -> bool:
        """Quarantine the worker once ``after_refused`` of its results were refused; True
        when it happened now."""
        return await self.db.fetchval("quarantine_worker", worker_id, after_refused, reason) is not None

    # closing a step
    async def publish_step(self, run_id: int, *, version: int, partial_step: int | None,
                           units: Sequence[NewUnit], next_seq: int, images_seen: int,
                           record: StepRecord | None) -> None:
        """Announce ``version`` (already written) in one light transaction: cancel what a
        partial step left open, retarget unstarted units, queue the next ones, move the run."""
        async with self.db.transaction() as tx:
            if partial_step is not None:
                await tx.execute("cancel_open_units", run_id, partial_step)
            await tx.execute("retarget_pending_units", run_id, version)
            await self.insert_units(tx, run_id, units)
            await tx.execute("set_run_position", run_id, version, next_seq, images_seen)
            if record is not None:
                m = record.metrics
                await tx.execute("insert_metrics", run_id, record.step, record.epoch, record.images, record.units,
                                 m.get("g_loss"), m.get("d_loss"), m.get("d_x"), m.get("d_g_z"), None)

    async def prune(self, run_id: int, *, keep_versions_from: int, keep_state_version: int) -> None:
        """Drop versions no live unit needs, optimizer state but the newest saved one, and
        finished units; the space goes back to the table at the next vacuum."""
        await self.db.execute("prune_weights", run_id, keep_versions_from, keep_state_version)
        await self.db.execute("prune_optimizer_state", run_id, keep_state_version)
        # Unit rows are small: keep two more steps of them, to show how recent steps ended.
        await self.db.execute("prune_units", run_id, keep_versions_from - 2)

    async def vacuum_blobs(self) -> None:
        """Make the space of deleted blobs reusable for the next step's (see sql/002_bounded.sql)."""
        await self.db.execute("vacuum_blobs")

    async def online_workers_any(self, within_s: float) -> int:
        return int(await self.db.fetchval("online_workers_any", within_s))

    async def queued_rounds(self, run_id: int, from_step: int) -> list[Round]:
        return [Round(int(r["step"]), int(r["start"]), int(r["width"]))
                for r in await self.db.fetch("queued_rounds", run_id, from_step)]

    async def online_workers(self, run_id: int, within_s: float) -> int:
        return int(await self.db.fetchval("online_workers", run_id, within_s))

    # the curve and the log
    async def record_swd(self, run_id: int, step: int, swd: float) -> None:
        await self.db.execute("record_swd", run_id, step, swd)

    async def run_metrics(self, run_id: int) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.db.fetch("run_metrics", run_id)]

    async def event(self, run_id: int | None, kind: str, message: str) -> None:
        await self.db.execute("insert_event", run_id, kind, message)


class WorkerStore:
    """Everything a worker reads and writes, through the ganns_api functions only: a
    student's login may call nothing else (sql/003_roles.sql)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def active_run(self) -> RunRow | None:
        row = await self.db.fetchrow("api_active_run")
        return RunRow.of(row) if row else None

    async def register(self, label: str, hostname: str, device: str, cpu: str | None,
                       gpu: str | None, resources: Resources | None = None) -> tuple[int, str]:
        """A worker row for this login: ``(id, name)``. A student's worker is named after the
        login (plus ``label``), whatever it asked for. ``resources`` are the numbers the
        projector adds up; the server keeps only values within its ranges (sql/005_resources.sql)."""
        r = await self.db.fetchrow(
            "api_register_resources", label, hostname, device, cpu, gpu,
            resources.cpu_cores if resources else None, resources.gpu_count if resources else None,
            resources.gpu_memory_bytes if resources else None, resources.gpu_name if resources else None)
        assert r is not None
        return int(r["worker_id"]), str(r["worker_name"])

    async def heartbeat(self, worker_id: int, state: str, run_id: int | None) -> str | None:
        """Returns why the coordinator quarantined this worker (it gets no more units), or None."""
        return await self.db.fetchval("api_heartbeat", worker_id, str(state), run_id, timeout=SHORT_TIMEOUT_S)

    async def leave(self, worker_id: int) -> list[int]:
        """Give back every unit held, go offline, log the goodbye; returns the units released."""
        return [int(r[0]) for r in await self.db.fetch("api_leave", worker_id)]

    async def claim(self, run_id: int, worker_id: int, lease_s: float) -> UnitRow | None:
        r = await self.db.fetchrow("api_claim", worker_id, run_id, lease_s, timeout=SHORT_TIMEOUT_S)
        if r is None:
            return None
        return UnitRow(int(r["id"]), int(r["run_id"]), int(r["seq"]), int(r["step"]), int(r["version"]),
                       int(r["epoch"]), tuple(r["indices"]), int(r["noise_seed"]), r["weights_at"])

    async def extend_lease(self, unit_id: int, worker_id: int, lease_s: float) -> bool:
        return bool(await self.db.fetchval("api_extend_lease", worker_id, unit_id, lease_s, timeout=SHORT_TIMEOUT_S))

    async def weights(self, run_id: int, version: int) -> bytes | None:
        return await self.db.fetchval("api_weights", run_id, version)

    async def submit(self, unit: UnitRow, worker_id: int, n_samples: int, blob: bytes) -> str:
        """Store the result and mark the unit done, atomically. Returns ``stored``, ``lost``
        (the lease expired) or ``refused: why`` (over a server-side limit)."""
        return str(await self.db.fetchval("api_submit", worker_id, unit.id, n_samples, blob))

    async def report_unusable(self, unit: UnitRow, worker_id: int, reason: str) -> str:
        """This unit cannot be computed here (bad indices...): someone else tries it."""
        return str(await self.db.fetchval("api_report_unusable", worker_id, unit.id, reason))

    async def release(self, unit_id: int, worker_id: int) -> bool:
        """Give a claimed unit back; False when it is not ours (any more) to give."""
        return bool(await self.db.fetchval("api_release", worker_id, unit_id))

    async def rank(self, worker_id: int) -> tuple[int, int] | None:
        r = await self.db.fetchrow("api_rank", worker_id)
        return (int(r["rank"]), int(r["total"])) if r and r["rank"] is not None else None
