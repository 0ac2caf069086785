"""The coordinator's step bookkeeping: pure, synchronous, no database, no tensors.

:class:`StepBook` decides what a stored result is worth (fold it, drop it as stale, or
ignore it as already counted), when the open step may close (all units in, given-up units
accounted for, or the deadline passed with ``min_units``), how long the loop may sleep, and
which rounds of the schedule to queue next and how wide. The coordinator feeds it facts
and clock readings; tests drive it in microseconds.

A step (a round) is one published weights version. Its units are consecutive in the unit
schedule: a :class:`Round` says where they start and how many there are. With a fixed
``units_per_step`` every round has that width; with ``units_per_step`` 0 ("auto") a round
is as wide as the number of workers online when it is planned, so every student gets
one unit of it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Admission(enum.Enum):
    FOLD = "fold"  # counts toward its step
    STALE = "stale"  # its step closed, it is not done, or its version is too old: drop it
    DUPLICATE = "duplicate"  # already counted (re-read after a lost connection)


@dataclass(frozen=True)
class CloseDecision:
    step: int
    partial: bool  # closed without every unit: cancel what is still open
    reason: str  # "complete", "given up" or "deadline"


@dataclass(frozen=True)
class Round:
    step: int
    start: int  # its first unit's position in the schedule
    width: int  # its number of units

    @property
    def end(self) -> int:
        return self.start + self.width


@dataclass
class StepBook:
    units_per_step: int  # 0: auto, one unit per online worker
    max_staleness: int
    step_timeout: float
    min_units: int
    step: int  # the open step (= the newest published version)
    opened_at: float  # clock reading when it opened
    max_steps: int | None = None
    next_seq: int = 0  # the schedule's first unit not planned yet
    _rounds: dict[int, Round] = field(default_factory=dict)  # queued rounds, not yet closed
    _arrived: dict[int, set[int]] = field(default_factory=dict)  # step -> units folded
    _given_up: dict[int, set[int]] = field(default_factory=dict)  # step -> units cancelled

    def admit(self, *, unit_id: int, unit_step: int, version: int, unit_done: bool) -> Admission:
        if unit_step < self.step or not unit_done or unit_step - version > self.max_staleness:
            return Admission.STALE
        if unit_id in self._arrived.get(unit_step, ()):
            return Admission.DUPLICATE
        return Admission.FOLD

    def folded(self, unit_step: int, unit_id: int) -> None:
        self._arrived.setdefault(unit_step, set()).add(unit_id)

    def planned(self, step: int, seq: int) -> bool:
        """Whether schedule position ``seq`` is one of the units planned for ``step``."""
        r = self._rounds.get(step)
        return r is not None and r.start <= seq < r.start + r.width

    def give_up(self, unit_step: int, unit_id: int) -> None:
        """A unit rejected too often: its step goes on without it."""
        self._given_up.setdefault(unit_step, set()).add(unit_id)

    def arrived(self, step: int | None = None) -> int:
        return len(self._arrived.get(self.step if step is None else step, ()))

    def overdue(self, now: float) -> bool:
        return now - self.opened_at >= self.step_timeout

    def width(self, step: int | None = None) -> int:
        """Units planned for ``step`` (default: the open one)."""
        r = self._rounds.get(self.step if step is None else step)
        return r.width if r is not None else max(1, self.units_per_step)

    def ready(self, now: float) -> CloseDecision | None:
        """Whether the open step may close now, and how."""
        arrived = self.arrived()
        given_up = len(self._given_up.get(self.step, ()))
        if arrived + given_up >= self.width():
            return CloseDecision(self.step, partial=given_up > 0, reason="given up" if given_up else "complete")
        if self.overdue(now) and arrived >= self.min_units:
            return CloseDecision(self.step, partial=True, reason="deadline")
        return None

    def wake_at(self, now: float, sweep_at: float) -> float:
        """When the loop must look again even if no notification comes."""
        if self.overdue(now):
            return sweep_at  # overdue but short of min_units: wait for gradients, don't spin
        return min(sweep_at, self.opened_at + self.step_timeout)

    def close(self, now: float) -> int:
        """The open step was published as the next version; returns the step that closed."""
        closed = self.step
        self._arrived.pop(closed, None)
        self._given_up.pop(closed, None)
        self._rounds.pop(closed, None)
        self.step = closed + 1
        self.opened_at = now
        return closed

    def finished(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def rounds_to_queue(self, online: int, step: int | None = None) -> list[Round]:
        """The rounds that must exist while ``step`` (default: the open one) is open and are
        not planned yet: its own and the next ``max_staleness``, never past ``max_steps``.
        ``online`` (workers online now) sizes them when the width is auto. Pure: call
        :meth:`queued` once they are stored."""
        open_step = self.step if step is None else step
        last = open_step + self.max_staleness
        if self.max_steps is not None:
            last = min(last, self.max_steps - 1)
        first = max(open_step, max(self._rounds) + 1 if self._rounds else open_step)
        width = self.units_per_step or max(1, online)
        out = []
        seq = self.next_seq
        for s in range(first, last + 1):
            out.append(Round(s, seq, width))
            seq += width
        return out

    def queued(self, rounds: list[Round]) -> None:
        """These rounds' units are in the database now."""
        for r in rounds:
            self._rounds[r.step] = r
            self.next_seq = max(self.next_seq, r.end)

    def round_start(self, step: int, pending: list[Round] | None = None) -> int:
        """Where ``step``'s units start in the schedule (queued, or about to be)."""
        for r in (pending or []):
            if r.step == step:
                return r.start
        r = self._rounds.get(step)
        if r is not None:
            return r.start
        if any(s > step for s in self._rounds):
            raise KeyError(f"round {step} is not planned")
        return self.next_seq  # the next round to be planned starts where the schedule stops

    def capacity(self) -> int:
        """How many units can be worked on at once: one per queued unit."""
        if self._rounds:
            return sum(r.width for s, r in self._rounds.items() if s >= self.step)
        return max(1, self.units_per_step) * (self.max_staleness + 1)


def idle_notice(online: int, capacity: int) -> str | None:
    """The instructor's hint when more students are online than there are units to share."""
    idle = online - capacity
    if idle <= 0:
        return None
    return (f"{idle} of {online} workers idle: only {capacity} unit(s) can be computed at once; "
            "raise --units-per-step (or --max-staleness) to give everyone work")
