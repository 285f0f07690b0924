"""The stored form of a loan or advance outcome (the idempotency record a replay
answers from)."""

from __future__ import annotations

import dataclasses

import pytest

from extrabalance.core.reasons import Reason
from extrabalance.service.outcomes import BorrowOutcome, BorrowStatus


def test_every_field_but_replayed_is_stored_and_read_back():
    outcome = BorrowOutcome(BorrowStatus.REFUSED, Reason.CEILING_REACHED, "L1", 4, 500, 50, 1100)
    data = outcome.to_json()
    stored = {f.name for f in dataclasses.fields(BorrowOutcome)} - {"replayed"}
    assert set(data) == stored
    assert data["status"] == "REFUSED" and data["reason"] == "CEILING_REACHED"
    again = BorrowOutcome.from_json(data, replayed=True)
    assert again == dataclasses.replace(outcome, replayed=True)


def test_a_grant_has_no_reason():
    data = BorrowOutcome(BorrowStatus.GRANTED, None, "L2", 1, 100, 10, 110).to_json()
    assert data["reason"] is None
    assert BorrowOutcome.from_json(data, replayed=False).reason is None


def test_an_advance_outcome_is_kept_as_its_decision_and_read_back():
    from extrabalance.service.outcomes import AdvanceDecision, AdvanceOutcome

    for decision in AdvanceDecision:
        outcome = AdvanceOutcome(decision, 500 if decision is AdvanceDecision.ADVANCED else None,
                                 None if decision is AdvanceDecision.ADVANCED
                                 else Reason.CEILING_REACHED, "L1")
        data = outcome.to_json()
        assert data["decision"] == decision.value and "result_code" not in data
        assert AdvanceOutcome.from_json(data, replayed=True) == dataclasses.replace(
            outcome, replayed=True)


def test_rows_kept_before_decisions_hold_the_result_code_and_are_still_read():
    from extrabalance.service.outcomes import AdvanceDecision, AdvanceOutcome

    rows = [
        ({"result_code": 2001, "granted_minor": 500, "reason": None, "loan_id": "L1"},
         AdvanceDecision.ADVANCED),
        ({"result_code": 2001, "granted_minor": None, "reason": None, "loan_id": None},
         AdvanceDecision.ACKNOWLEDGED),
        ({"result_code": 4012, "granted_minor": None, "reason": "NOT_OPTED_IN", "loan_id": None},
         AdvanceDecision.NO_ADVANCE),
        ({"result_code": 4010, "reason": "BARRED_MANUAL"}, AdvanceDecision.DENIED),
        ({"result_code": 5030, "reason": "UNKNOWN_SUBSCRIBER"},
         AdvanceDecision.UNKNOWN_SUBSCRIBER),
        ({"result_code": 5002}, AdvanceDecision.UNKNOWN_SESSION),
    ]
    for row, decision in rows:
        read = AdvanceOutcome.from_json(row, replayed=True)
        assert read.decision is decision and read.replayed
        assert read.granted_minor == row.get("granted_minor")
    assert AdvanceOutcome.from_json(rows[2][0], replayed=True).reason is Reason.NOT_OPTED_IN
    with pytest.raises(ValueError, match="Result-Code 5031"):
        AdvanceOutcome.from_json({"result_code": 5031}, replayed=True)


def test_the_gy_adapter_says_every_decision_and_an_old_row_the_same_way():
    """The CCA a decision gets is the one an older row's Result-Code recorded."""
    from extrabalance.adapters.gy_server import RESULT_CODES, result_code
    from extrabalance.diameter import constants as rc
    from extrabalance.service.outcomes import AdvanceDecision, AdvanceOutcome

    assert set(RESULT_CODES) == set(AdvanceDecision)
    assert result_code(AdvanceOutcome(AdvanceDecision.ADVANCED, 500)) == rc.DIAMETER_SUCCESS
    assert result_code(AdvanceOutcome(AdvanceDecision.NO_ADVANCE)) == 4012
    for decision, code in RESULT_CODES.items():
        granted = 500 if decision is AdvanceDecision.ADVANCED else None
        old = AdvanceOutcome.from_json({"result_code": code, "granted_minor": granted},
                                       replayed=True)
        assert old.decision is decision
