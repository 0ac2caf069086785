"""The unit state machine's table (ganns_async/states.py); the guard trigger that enforces
the same table in PostgreSQL is tried in tests/integration/test_states.py."""

from __future__ import annotations

from ganns_async.states import UNIT_TRANSITIONS, UnitState, unit_transition_allowed


def test_table_covers_every_state_and_cancelled_is_final() -> None:
    assert set(UNIT_TRANSITIONS) == set(UnitState)
    assert UNIT_TRANSITIONS[UnitState.CANCELLED] == frozenset()
    assert all(s not in targets for s, targets in UNIT_TRANSITIONS.items())  # staying is not a change
    # Every state but cancelled can reach pending again or is pending: nothing is stranded.
    for state in UnitState:
        if state is not UnitState.CANCELLED:
            assert state is UnitState.PENDING or UnitState.PENDING in UNIT_TRANSITIONS[state]
    assert unit_transition_allowed("done", "done")
    assert not unit_transition_allowed("cancelled", "pending")
