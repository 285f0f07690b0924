"""The stored form of a loan outcome (the idempotency record a replay answers from)."""

from __future__ import annotations

import dataclasses

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
