"""Two nodes on one PostgreSQL ledger: two `PostgresLedger`s (two pools, as two node
processes would have) race one subscriber with many concurrent borrow units. The
subscriber lock must keep every decision on the latest committed state: the debt never
passes the ceiling and one request key never gets two loans."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from datetime import UTC, datetime

from extrabalance.core import sagas
from extrabalance.core.lending import BorrowRequest, Granted, decide
from extrabalance.core.model import SubscriberProfile
from extrabalance.core.policy import Condition, EligibilityPolicy, RuleOp, Segment
from extrabalance.service.unit_of_work import LedgerTx
from tests.core.sample import make_policy
from tests.pg import fresh_schema

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
M = "201001234567"
CEILING = 5_000  # minor units: 45 loans of 100 + 10 fee fit, the 46th does not
# GOLD's rules with a small ceiling and no bad-debt bar, so only the ceiling stops him.
POLICY = make_policy(segments=(Segment(
    "all", (Condition("tenure_days", RuleOp.GE, 0),), CEILING, (1,), "ten_percent", 1_000_000),),
    eligibility=EligibilityPolicy())
REQUESTS = 200  # distinct request keys; each is sent to both nodes
POOL = 4  # connections per node


def borrow(key: str):  # type: ignore[no-untyped-def]
    """The lending service's intent, as one unit: replay check, decision, booking."""

    def unit(tx: LedgerTx) -> str | None:
        done = tx.loan_by_idempotency_key(key)
        if done is not None:
            return done.loan_id
        loaded = tx.load_subscriber(M)
        decision = decide(BorrowRequest(M, 1, "ussd"), loaded.state, POLICY, NOW)
        if not isinstance(decision, Granted):
            return None
        return tx.insert_loan(
            msisdn=M, tier_id=1, principal_minor=decision.amount_minor,
            fee_minor=decision.fee_minor, state=sagas.ACTIVE, channel="ussd",
            idempotency_key=key, in_node="in-a", session_id=f"s;{key}", now=NOW,
            subscriber_known=loaded.known,
        )

    return unit


async def test_two_nodes_racing_one_subscriber_never_pass_the_ceiling() -> None:
    from extrabalance.ledger.postgres import PostgresLedger

    with fresh_schema("eb_nodes") as conninfo:
        node_a = PostgresLedger(conninfo, pool_max=POOL)
        node_b = PostgresLedger(conninfo, pool_max=POOL, migrate=False)
        try:
            await node_a.write(lambda tx: tx.put_profile(SubscriberProfile(M, 400, 5000), NOW))
            # Both nodes get every request (an IN retrying over the other peer), in
            # opposite orders, all at once.
            work = [node_a.write(borrow(f"ussd:{n}")) for n in range(REQUESTS)]
            work += [node_b.write(borrow(f"ussd:{n}")) for n in reversed(range(REQUESTS))]
            results = await asyncio.gather(*work)

            granted = {r for r in results if r is not None}
            owed = await node_b.read(lambda tx: tx.debt_owed(M))
            assert owed <= CEILING
            assert len(granted) == CEILING // 110 and owed == len(granted) * 110
            loans = await node_a.read(lambda tx: tx.conn.execute(
                "SELECT idempotency_key FROM loans WHERE msisdn = %s", (M,)).fetchall())
            per_key = Counter(k for (k,) in loans)
            assert per_key and max(per_key.values()) == 1
            assert await node_a.read(lambda tx: tx.debt_from_journal(M)) == owed
            # a replayed request got the loan its first run booked, on either node
            for n in range(REQUESTS):
                a, b = results[n], results[2 * REQUESTS - 1 - n]
                assert a == b, f"ussd:{n}: {a} on one node, {b} on the other"
        finally:
            await node_a.close()
            await node_b.close()


async def test_a_deadlock_between_two_subscribers_is_retried() -> None:
    """Units locking two subscribers in opposite orders: the server breaks the
    deadlock by failing one, which runs again and commits."""
    from extrabalance.ledger.postgres import PostgresLedger

    m2 = "201001234568"
    with fresh_schema("eb_nodes") as conninfo:
        node_a = PostgresLedger(conninfo, pool_max=POOL)
        node_b = PostgresLedger(conninfo, pool_max=POOL, migrate=False)
        try:
            both = threading.Barrier(2, timeout=120)  # a bound, not a timing margin

            def pair(first: str, second: str):  # type: ignore[no-untyped-def]
                runs: list[int] = []

                def unit(tx: LedgerTx) -> None:
                    tx.learn_route(first, "in-a", NOW)  # his lock taken
                    runs.append(1)
                    if len(runs) == 1:
                        both.wait()  # each unit holds one subscriber and wants the other
                    tx.learn_route(second, "in-b", NOW)

                return unit

            await asyncio.gather(node_a.write(pair(M, m2)), node_b.write(pair(m2, M)))
            assert node_a.retries + node_b.retries >= 1
            routes = await node_a.read(lambda tx: (tx.learned_route(M), tx.learned_route(m2)))
            assert set(routes) <= {"in-a", "in-b"} and None not in routes
        finally:
            await node_a.close()
            await node_b.close()


async def test_a_deadlock_found_at_the_commit_is_retried() -> None:
    """The statement that deadlocks is one whose result the unit never reads: it goes
    out with the COMMIT, so the server's error comes back with the COMMIT's batch.
    The unit is rolled back and runs again, and both units commit once."""
    from extrabalance.ledger.postgres import PostgresLedger

    m2 = "201001234568"
    with fresh_schema("eb_nodes") as conninfo:
        node_a = PostgresLedger(conninfo, pool_max=POOL)
        node_b = PostgresLedger(conninfo, pool_max=POOL, migrate=False)
        try:
            for m in (M, m2):
                await node_a.write(lambda tx, m=m: tx.put_profile(
                    SubscriberProfile(m, 400, 300, {}), NOW))
            both = threading.Barrier(2, timeout=120)  # a bound, not a timing margin

            def pair(first: str, second: str):  # type: ignore[no-untyped-def]
                runs: list[int] = []

                def unit(tx: LedgerTx) -> None:
                    tx.load_subscriber(first)  # his lock, with the read
                    runs.append(1)
                    if len(runs) == 1:
                        both.wait()  # each unit holds one subscriber and wants the other
                    tx.audit(first, "note", "test", f"{first} then {second}", NOW)
                    # queued, never read: it waits for the other's lock at the COMMIT
                    tx.execute(  # type: ignore[attr-defined]
                        "UPDATE subscribers SET loans_since_full_payback ="
                        " loans_since_full_payback + 1 WHERE msisdn = ?", (second,))

                return unit

            await asyncio.gather(node_a.write(pair(M, m2)), node_b.write(pair(m2, M)))
            assert node_a.retries + node_b.retries >= 1
            for m in (M, m2):
                loaded = await node_a.read(lambda tx, m=m: tx.load_subscriber(m))
                assert loaded.state.loans_since_full_payback == 1  # once each, not twice
                trail = await node_a.read(lambda tx, m=m: tx.audit_trail(m, ("note",)))
                assert len(trail) == 1
        finally:
            await node_a.close()
            await node_b.close()
