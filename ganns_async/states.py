"""The states of a work unit and of a worker: one vocabulary for Python, SQL and the screens.

A work unit's life (the guard trigger of ``sql/004_states.sql`` refuses any other move)::

        +------- release, lease expired, reported unusable ---+
        v                                                     |
     pending ------------------ claim -------------------> claimed
      ^   ^                                                    |
      |   |                                                  submit
      |   |                                                    v
      |   +------- refused, or its result lost ------------- done
      |                                                        |
      |                                                      fold
      |                                                        v
      +------------ its sum lost with the coordinator ------- used

     pending, claimed, done ---- step closed, stale, given up ----> cancelled (final)

``used`` goes back to ``pending`` only when the in-memory sum it was folded into died with
the coordinator (``--resume`` of an open step); ``done`` goes back when its result was refused
or lost (the UNLOGGED gradients table is empty after a server crash). ``cancelled`` is final.
Deleting a unit (a rewind, pruning old steps) is not a transition.

A worker is ``waiting`` (no run), ``idle``, ``computing``, ``uploading``, ``paused`` (the run
is) or ``offline`` (left); the database stores the same words. Dashboards add two labels that
are not stored states: ``stale`` (online but silent too long) and ``quarantined``.
"""

from __future__ import annotations

import enum


class UnitState(enum.StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    DONE = "done"  # its result is in the gradients table
    USED = "used"  # its result was folded into its step's sum
    CANCELLED = "cancelled"  # no longer wanted (its step closed, or it was given up)


# Every legal change of state. The same table is the body of ganns_unit_state_guard() in
# sql/004_states.sql; tests/…/test_states.py tries all 20 changes against PostgreSQL.
UNIT_TRANSITIONS: dict[UnitState, frozenset[UnitState]] = {
    UnitState.PENDING: frozenset({UnitState.CLAIMED, UnitState.CANCELLED}),
    UnitState.CLAIMED: frozenset({UnitState.PENDING, UnitState.DONE, UnitState.CANCELLED}),
    UnitState.DONE: frozenset({UnitState.USED, UnitState.PENDING, UnitState.CANCELLED}),
    UnitState.USED: frozenset({UnitState.PENDING}),
    UnitState.CANCELLED: frozenset(),
}


def unit_transition_allowed(before: UnitState | str, after: UnitState | str) -> bool:
    """Whether a unit may go from ``before`` to ``after`` (staying put is always allowed)."""
    b, a = UnitState(before), UnitState(after)
    return a == b or a in UNIT_TRANSITIONS[b]


class WorkerState(enum.StrEnum):
    WAITING = "waiting"  # connected, no active run
    IDLE = "idle"  # on a run, no unit to compute
    COMPUTING = "computing"
    UPLOADING = "uploading"
    PAUSED = "paused"  # the run is paused
    OFFLINE = "offline"  # left (set by ganns_api.leave, never by a heartbeat)


# What a heartbeat may report (offline is what leaving sets).
REPORTED_WORKER_STATES: frozenset[WorkerState] = frozenset(WorkerState) - {WorkerState.OFFLINE}

# Dashboard labels that are conditions, not stored states.
STALE = "stale"
QUARANTINED = "quarantined"
