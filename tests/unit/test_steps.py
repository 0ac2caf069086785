"""The coordinator's step bookkeeping, driven without PostgreSQL or tensors."""

from __future__ import annotations

from ganns_async.steps import Admission, Round, StepBook, idle_notice


def book(**kw: object) -> StepBook:
    args: dict[str, object] = dict(units_per_step=3, max_staleness=1, step_timeout=10.0, min_units=2,
                                   step=0, opened_at=100.0)
    args.update(kw)
    return StepBook(**args)  # type: ignore[arg-type]


def test_a_step_closes_when_every_unit_is_folded() -> None:
    b = book()
    for unit in (1, 2):
        assert b.admit(unit_id=unit, unit_step=0, version=0, unit_done=True) is Admission.FOLD
        b.folded(0, unit)
    assert b.ready(101.0) is None
    b.folded(0, 3)
    decision = b.ready(101.0)
    assert decision is not None and decision.step == 0 and not decision.partial and decision.reason == "complete"
    assert b.close(102.0) == 0
    assert b.step == 1 and b.opened_at == 102.0 and b.arrived() == 0


def test_each_unit_counts_once() -> None:
    b = book()
    b.folded(0, 1)
    assert b.admit(unit_id=1, unit_step=0, version=0, unit_done=True) is Admission.DUPLICATE
    b.folded(0, 1)
    assert b.arrived() == 1


def test_stale_gradients_are_refused() -> None:
    b = book(step=5, opened_at=0.0)
    # its step already closed
    assert b.admit(unit_id=1, unit_step=4, version=4, unit_done=True) is Admission.STALE
    # computed on a version older than max_staleness allows
    assert b.admit(unit_id=2, unit_step=7, version=5, unit_done=True) is Admission.STALE
    assert b.admit(unit_id=3, unit_step=6, version=5, unit_done=True) is Admission.FOLD
    # the unit was cancelled or requeued meanwhile
    assert b.admit(unit_id=4, unit_step=5, version=5, unit_done=False) is Admission.STALE


def test_deadline_closes_with_min_units_and_not_before() -> None:
    b = book()
    b.folded(0, 1)
    assert b.ready(200.0) is None  # overdue, but 1 < min_units: keep waiting
    assert b.wake_at(200.0, sweep_at=215.0) == 215.0  # and do not spin while waiting
    b.folded(0, 2)
    assert b.ready(105.0) is None  # 2 units, not yet overdue
    assert b.wake_at(105.0, sweep_at=130.0) == 110.0  # wake at the deadline
    decision = b.ready(110.0)
    assert decision is not None and decision.partial and decision.reason == "deadline"


def test_given_up_units_do_not_block_a_step() -> None:
    b = book()
    b.folded(0, 1)
    b.folded(0, 2)
    b.give_up(0, 3)
    decision = b.ready(100.5)
    assert decision is not None and decision.partial and decision.reason == "given up"


def test_later_steps_fold_ahead_and_count_when_they_open() -> None:
    b = book()
    b.folded(1, 10)  # staleness 1: step 1's units are computed while step 0 is open
    for unit in (1, 2, 3):
        b.folded(0, unit)
    b.close(101.0)
    assert b.arrived() == 1


def test_queue_covers_the_open_step_and_the_staleness_window() -> None:
    assert book().rounds_to_queue(online=0) == [Round(0, 0, 3), Round(1, 3, 3)]  # steps 0 and 1
    assert book(max_staleness=0).rounds_to_queue(online=0) == [Round(0, 0, 3)]
    assert book(max_steps=1).rounds_to_queue(online=0) == [Round(0, 0, 3)]  # never past the last step
    b = book()
    b.queued(b.rounds_to_queue(online=0))
    assert b.next_seq == 6 and b.capacity() == 6
    for unit in (1, 2, 3):
        b.folded(0, unit)
    pending = b.rounds_to_queue(online=0, step=1)
    assert pending == [Round(2, 6, 3)]  # only the round not planned yet
    assert b.round_start(2, pending) == 6 and b.round_start(1) == 3
    b.queued(pending)
    b.close(101.0)
    assert b.rounds_to_queue(online=0) == [] and b.round_start(1) == 3
    assert book(max_steps=2, step=2).finished()


def test_auto_width_gives_each_online_worker_a_unit() -> None:
    b = book(units_per_step=0, max_staleness=0)
    first = b.rounds_to_queue(online=0)
    assert first == [Round(0, 0, 1)]  # nobody online yet: at least one unit
    b.queued(first)
    b.folded(0, 1)
    assert b.ready(100.5) is not None
    nxt = b.rounds_to_queue(online=5, step=1)
    assert nxt == [Round(1, 1, 5)]  # five students online: five units
    b.queued(nxt)
    b.close(101.0)
    for unit in range(2, 6):
        b.folded(1, unit)
    assert b.ready(101.5) is None  # four of five
    b.folded(1, 6)
    decision = b.ready(101.5)
    assert decision is not None and decision.reason == "complete"
    b.close(102.0)
    # the round after the last planned one starts where the schedule stops
    assert b.round_start(2) == 6


def test_a_round_closes_on_its_deadline_with_the_units_it_has() -> None:
    b = book(units_per_step=0, max_staleness=0, min_units=1)
    b.queued(b.rounds_to_queue(online=4))
    b.folded(0, 1)
    assert b.ready(105.0) is None
    decision = b.ready(110.0)
    assert decision is not None and decision.partial and decision.reason == "deadline"


def test_idle_notice_names_the_gap() -> None:
    assert idle_notice(online=4, capacity=4) is None
    assert idle_notice(online=0, capacity=4) is None
    text = idle_notice(online=30, capacity=18)
    assert text is not None and text.startswith("12 of 30 workers idle") and "--units-per-step" in text
