"""Statements and round trips per unit of work on the PostgreSQL ledger, counted by the
adapter (`PostgresLedger.wire_counts`): the lending service's loan (intent, an IN that
answers at once, settlement with its outbox row) and the USSD menu's read (`overview`),
one at a time, on a schema of the run's own.

    python -m bench.pg_round_trips [--loans 200] [--pg-dsn postgresql://...]

Prints JSON. docs/benchmarks.md ("Pipelined statements, worker threads") has the
figures and what they were before.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from typing import Any

from bench.ledger import NOW, POLICY, InstantIn, NullEvents, NullNotifier, msisdn
from extrabalance.argparsing import Parser
from extrabalance.core.model import SubscriberProfile
from extrabalance.ledger.postgres import PostgresLedger
from extrabalance.service.lending import LendingService
from extrabalance.service.locks import SubscriberLocks
from extrabalance.service.routing import Router, RouteRule


async def count(conninfo: str, loans: int) -> dict[str, Any]:
    ledger = PostgresLedger(conninfo, pool_max=2, pool_min=2)
    try:
        for i in range(loans):
            profile = SubscriberProfile(msisdn(i), 400, 300, {})
            await ledger.write(lambda tx, p=profile: tx.put_profile(p, NOW))
        lending = LendingService(ledger, InstantIn(), NullNotifier(), NullEvents(), POLICY,
                                 Router([RouteRule("in-a", prefix="20")]), lambda: NOW,
                                 locks=SubscriberLocks())
        start = ledger.wire_counts()
        for i in range(loans):
            await lending.overview(msisdn(i))
        menus = ledger.wire_counts()
        granted = 0
        for i in range(loans):
            outcome = await lending.borrow(msisdn(i), 1, "ussd", f"rt:{i}")
            granted += outcome.status.value == "GRANTED"
        end = ledger.wire_counts()
    finally:
        await ledger.close()

    def per(a: dict[str, int], b: dict[str, int]) -> dict[str, float]:
        return {k: round((b[k] - a[k]) / loans, 2) for k in ("statements", "round_trips")}

    return {"loans": loans, "granted": granted, "menu_read": per(start, menus),
            "loan": per(menus, end)}


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m bench.pg_round_trips", description=__doc__.split("\n\n")[0])
    parser.add_argument("--loans", type=int, default=200)
    parser.add_argument(
        "--pg-dsn",
        default=os.environ.get("EB_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args(argv)
    import psycopg
    from psycopg.conninfo import make_conninfo

    schema = f"eb_rt_{secrets.token_hex(4)}"
    with psycopg.connect(args.pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        result = asyncio.run(count(make_conninfo(args.pg_dsn, options=f"-c search_path={schema}"),
                                   args.loans))
    finally:
        with psycopg.connect(args.pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
