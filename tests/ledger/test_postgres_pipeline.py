"""The PostgreSQL adapter queues a unit's statements and sends them in batches (libpq's
pipeline mode): an error anywhere in a batch must still reach the unit, and a unit
whose transaction an error aborted must never pass for committed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.pg import pg_ledger

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def ledger() -> AsyncIterator[Any]:
    async with pg_ledger() as pg:
        yield pg


async def test_an_error_in_a_statements_first_use_is_raised(ledger: Any) -> None:
    import psycopg

    def unit(tx: Any) -> Any:
        tx.idempotent_put("k", {"x": 1}, NOW)
        # prepared on first use: the server refuses the statement itself
        return tx.execute("SELECT no_such_column FROM subscribers").fetchall()

    with pytest.raises(psycopg.errors.UndefinedColumn):
        await ledger.write(unit)
    assert await ledger.read(lambda tx: tx.idempotent_get("k")) is None


async def test_a_unit_that_swallows_an_error_is_not_committed(ledger: Any) -> None:
    import psycopg

    def unit(tx: Any) -> str:
        tx.idempotent_put("k", {"x": 1}, NOW)
        try:
            tx.execute("SELECT 1 / 0").fetchall()
        except psycopg.errors.DivisionByZero:
            pass  # the transaction is aborted all the same
        return "done"

    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
        await ledger.write(unit)
    assert await ledger.read(lambda tx: tx.idempotent_get("k")) is None
    # the connection is usable again
    await ledger.write(lambda tx: tx.idempotent_put("k", {"x": 2}, NOW))
    assert await ledger.read(lambda tx: tx.idempotent_get("k")) == {"x": 2}


async def test_writes_never_read_go_out_with_the_commit(ledger: Any) -> None:
    before = ledger.wire_counts()

    def unit(tx: Any) -> None:
        for n in range(5):
            tx.idempotent_put(f"k{n}", {"n": n}, NOW)

    await ledger.write(unit)
    sent = {k: v - before[k] for k, v in ledger.wire_counts().items()}
    assert sent == {"round_trips": 1, "statements": 7}  # BEGIN, 5 inserts, COMMIT
    got = await ledger.read(lambda tx: [tx.idempotent_get(f"k{n}") for n in range(5)])
    assert got == [{"n": n} for n in range(5)]
