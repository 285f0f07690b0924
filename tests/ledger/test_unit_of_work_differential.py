"""The in-memory ledger against the SQLite one, on random sequences of saga operations
(legal and illegal): after every operation both raised the same kind of error or
neither did, and both show the same loans, recoveries, debts and account totals.
The service layer's split (`core.payback.split`) decides each debit, as in
`PaybackService`."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extrabalance.core import sagas
from extrabalance.core.payback import split
from extrabalance.core.policy import PaybackOrder, RecoveryPolicy
from extrabalance.ledger.db import connect, migrate
from extrabalance.ledger.memory import DuplicateKey, MemoryUnitOfWork
from extrabalance.service.unit_of_work import LedgerTx

T = TypeVar("T")
START = datetime(2026, 1, 1, tzinfo=UTC)
MSISDNS = ("201001000001", "201001000002")
POLICY = RecoveryPolicy(order=PaybackOrder.FEE_FIRST)

ops = st.one_of(
    st.tuples(
        st.just("loan"),
        st.integers(0, 1),
        st.sampled_from(sagas.LOAN_STATES),
        st.integers(1, 50),
        st.integers(0, 9),
        st.none() | st.integers(0, 3),
    ),
    st.tuples(st.just("settle"), st.integers(0, 7), st.sampled_from(sagas.LOAN_STATES)),
    st.tuples(st.just("advance"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("recovery"), st.integers(0, 1), st.integers(0, 3)),
    st.tuples(st.just("debit"), st.integers(0, 3), st.integers(0, 80)),
    st.tuples(st.just("rec_state"), st.integers(0, 3), st.sampled_from(sagas.RECOVERY_STATES)),
    st.tuples(st.just("attempt"), st.integers(0, 3)),
    st.tuples(st.just("write_off"), st.integers(0, 7)),
)


class Side:
    """One adapter, with the ids it gave out in creation order."""

    def __init__(self, run: Callable[[Callable[[LedgerTx], Any]], Any]) -> None:
        self.run = run
        self.loans: list[str] = []
        self.recoveries: list[str] = []


def _sqlite_side() -> tuple[Side, sqlite3.Connection]:
    conn = connect(":memory:", synchronous="OFF")
    migrate(conn)

    def run(fn: Callable[[LedgerTx], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            value = fn(conn)  # type: ignore[arg-type]  # a SqliteLedgerTx
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return value

    return Side(run), conn


def _apply(side: Side, op: tuple[Any, ...], now: datetime) -> str:
    """Run one operation; returns "ok" or the kind of error it raised."""
    kind = op[0]

    def loan(i: int) -> str:
        return side.loans[i % len(side.loans)] if side.loans else "none"

    def rec(i: int) -> str:
        return side.recoveries[i % len(side.recoveries)] if side.recoveries else "none"

    def work(tx: LedgerTx) -> Any:
        if kind == "loan":
            _, m, state, principal, fee, key = op
            loan_id = tx.insert_loan(
                msisdn=MSISDNS[m],
                tier_id=1,
                principal_minor=principal,
                fee_minor=fee,
                state=state,
                channel="ussd",
                idempotency_key=None if key is None else f"k{key}",
                in_node="in-a",
                session_id="s",
                now=now,
            )
            side.loans.append(loan_id)
        elif kind == "settle":
            return tx.settle_loan(loan(op[1]), op[2], now).state
        elif kind == "advance":
            return tx.settle_advance(loan(op[1]), op[2], now).state
        elif kind == "recovery":
            rec_id = tx.insert_recovery(
                event_id=f"e{op[2]}",
                msisdn=MSISDNS[op[1]],
                recharge_minor=100,
                balance_after_minor=100,
                in_node="in-a",
                now=now,
                session_id="d",
                requested_minor=100,
            )
            side.recoveries.append(rec_id)
        elif kind == "debit":
            row = tx.get_recovery(rec(op[1]))
            if row is None:
                raise KeyError(op[1])
            loans = tx.open_loans(row.msisdn)
            owed = sum(x.owed_minor for x in loans)
            tx.apply_recovery(row, split(loans, min(op[2], owed), POLICY, owed), now)
        elif kind == "rec_state":
            tx.set_recovery_state(rec(op[1]), op[2], now)
        elif kind == "attempt":
            return tx.start_recovery_attempt(rec(op[1]), "d2", 50, now)
        elif kind == "write_off":
            return tx.write_off(loan(op[1]), "ageing", now)
        return None

    try:
        value = side.run(work)
    except sagas.IllegalTransition:
        return "illegal"
    except (DuplicateKey, sqlite3.IntegrityError):
        return "duplicate"
    except sagas.LedgerInvariantError:
        return "invariant"
    except KeyError:
        return "unknown id"
    return f"ok {value}"


def _snapshot(side: Side) -> dict[str, Any]:
    def read(tx: LedgerTx) -> dict[str, Any]:
        subscribers = {}
        for m in MSISDNS:
            loaded = tx.load_subscriber(m)
            assert tx.debt_owed(m) == tx.debt_from_journal(m) >= 0
            subscribers[m] = (
                tx.debt_owed(m),
                loaded.known,
                loaded.recovery_pending,
                loaded.state.operation_pending,
                loaded.state.loans_since_full_payback,
                [(x.principal_repaid_minor, x.fee_repaid_minor) for x in loaded.state.open_loans],
            )
        loans = [tx.get_loan(i) for i in side.loans]
        recs = [tx.get_recovery(i) for i in side.recoveries]
        totals = tx.account_totals()
        assert sum(totals.values()) == 0
        return {
            "subscribers": subscribers,
            "loans": [(x.state, x.principal_repaid_minor, x.fee_repaid_minor) for x in loans if x],
            "recoveries": [(r.state, r.attempts, r.recovered_minor) for r in recs if r],
            "totals": totals,
        }

    return side.run(read)  # type: ignore[no-any-return]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=25))
def test_memory_and_sqlite_agree_on_every_sequence(sequence: list[tuple[Any, ...]]) -> None:
    sqlite_side, conn = _sqlite_side()
    memory = MemoryUnitOfWork()
    memory_side = Side(memory.write_now)
    try:
        for n, op in enumerate(sequence):
            now = START + timedelta(seconds=n)
            got = (_apply(sqlite_side, op, now), _apply(memory_side, op, now))
            assert got[0] == got[1], f"step {n} {op}: sqlite {got[0]}, memory {got[1]}"
            assert _snapshot(sqlite_side) == _snapshot(memory_side), f"after step {n} {op}"
    finally:
        conn.close()
