"""CPU per ledger operation, without the writer or the disk: a borrow's intent and
settlement (`store.insert_loan` + `lending.settle_borrow`) and a payback's intent and
settlement (`store.insert_recovery` + `recovery.settle_recovery_done`), 200 per
transaction on one connection with `synchronous=OFF`. Prints JSON with the lowest of
`--repeat` runs (the least disturbed by other processes).

For an A/B of two checkouts on one machine, run this file against each in turn:
`cd CHECKOUT && PYTHONPATH=. python PATH/TO/bench/ledger_ops.py` (it uses only
functions both sides have). `--outbox` adds what the services write since the
transactional outbox: one outbox row per settlement (the loan's and the payback's
SMS); give it on the side that has the outbox.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bench.ledger import POLICY
from extrabalance.ledger import store
from extrabalance.ledger.db import connect, migrate
from extrabalance.service.lending import settle_borrow
from extrabalance.service.ports import InOutcome, InResult
from extrabalance.service.recovery import settle_recovery_done

BATCH_OPS = 200  # operations per transaction, as a busy group commit holds them
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _batched(conn: Any, count: int, op: Callable[[int], None]) -> float:
    """Run `op(i)` for i in range(count), BATCH_OPS per transaction; CPU seconds."""
    started = time.process_time()
    for i in range(count):
        if i % BATCH_OPS == 0:
            conn.execute("BEGIN")
        op(i)
        if i % BATCH_OPS == BATCH_OPS - 1:
            conn.execute("COMMIT")
    if conn.in_transaction:
        conn.execute("COMMIT")
    return time.process_time() - started


def put_message(conn: Any, msisdn: str, template: str, params: dict[str, int]) -> None:
    from extrabalance.ledger.outbox_store import outbox_put  # not on checkouts before it

    outbox_put(conn, msisdn=msisdn, template=template, params=params, kind="sms",
               language="en", now=NOW)


def one_run(loans: int, outbox: bool = False) -> tuple[float, float]:
    """(CPU µs per loan, CPU µs per payback) over `loans` subscribers."""
    with tempfile.TemporaryDirectory() as work:
        conn = connect(os.path.join(work, "ledger.db"), synchronous="OFF")
        migrate(conn)
        msisdns = [f"2010{i:08d}" for i in range(loans)]

        def lend(i: int) -> None:
            loan_id = store.insert_loan(
                conn,
                msisdn=msisdns[i],
                tier_id=2,
                principal_minor=1000,
                fee_minor=100,
                state=store.CREDITING,
                channel="ussd",
                idempotency_key=f"k{i}",
                in_node="in-a",
                session_id=f"s{i}",
                now=NOW,
            )
            settled = settle_borrow(conn, loan_id, InResult(InOutcome.DONE, 2001, 1000), NOW)
            if outbox:
                put_message(conn, msisdns[i], "loan_granted", {
                    "amount": settled.amount_minor or 0, "fee": settled.fee_minor or 0,
                    "debt": settled.debt_minor})

        def pay_back(i: int) -> None:
            recovery_id = store.insert_recovery(
                conn,
                event_id=f"e{i}",
                msisdn=msisdns[i],
                recharge_minor=700,
                balance_after_minor=700,
                in_node="in-a",
                now=NOW,
                session_id=f"d{i}",
                requested_minor=600,
            )
            paid = settle_recovery_done(
                conn, recovery_id, InResult(InOutcome.DONE, 2001, 600), POLICY, NOW
            )
            if outbox:
                put_message(conn, msisdns[i], "payback_partial",
                            {"recovered": paid.recovered_minor, "debt": paid.debt_minor})

        lent_s = _batched(conn, loans, lend)
        paid_s = _batched(conn, loans, pay_back)
        assert store.debt_owed(conn, msisdns[0]) == 500
        conn.close()
    return lent_s / loans * 1e6, paid_s / loans * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loans", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--outbox", action="store_true",
                        help="also write each settlement's outbox row (the SMS)")
    args = parser.parse_args(argv)
    runs = [one_run(args.loans, args.outbox) for _ in range(args.repeat)]
    print(
        json.dumps(
            {
                "loans": args.loans,
                "repeat": args.repeat,
                "outbox": args.outbox,
                "cpu_us_per_loan_min": round(min(r[0] for r in runs), 1),
                "cpu_us_per_payback_min": round(min(r[1] for r in runs), 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
