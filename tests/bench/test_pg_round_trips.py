"""`python -m bench.pg_round_trips` on the test server: the lending service's loan and
the USSD menu's read cost the round trips docs/benchmarks.md states (a statement that
stopped travelling with the next read or the COMMIT would add one)."""

from __future__ import annotations

from bench.pg_round_trips import count
from tests.pg import fresh_schema


async def test_a_loan_is_six_round_trips_and_the_menu_one() -> None:
    with fresh_schema() as conninfo:
        result = await count(conninfo, 5)
    assert result["granted"] == 5
    assert result["menu_read"] == {"statements": 3.0, "round_trips": 1.0}
    assert result["loan"]["round_trips"] <= 6.0  # intent 3, settlement 3
    assert result["loan"]["statements"] > result["loan"]["round_trips"]
