"""Two nodes on one PostgreSQL ledger, each with its own lending service and its own
in-process `SubscriberLocks` (nothing shared but the database and the IN): one
subscriber, 1,000 borrows at once, every request key sent to both nodes in opposite
orders (an IN or a gateway retrying over the other node). The database's subscriber
lock must give each decision the latest committed state: the debt never passes his
ceiling, one request key never gets two loans, the IN is credited once per loan and
the journal agrees with the loans."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime

from extrabalance.core.model import SubscriberProfile
from extrabalance.core.policy import Condition, EligibilityPolicy, RuleOp, Segment
from extrabalance.service.lending import LendingService
from extrabalance.service.locks import SubscriberLocks
from extrabalance.service.outcomes import BorrowStatus
from extrabalance.service.ports import InAction, InOperation, InResult
from extrabalance.service.routing import Router
from tests.core.sample import make_policy
from tests.pg import fresh_schema
from tests.service.fakes import ROUTES, Clock, FakeIn, FakeNotifier, ListEvents

M = "201001234567"
CEILING = 1_000  # minor units: nine loans of 100 + 10 fee fit, the tenth does not
POLICY = make_policy(segments=(Segment(
    "all", (Condition("tenure_days", RuleOp.GE, 0),), CEILING, (1,), "ten_percent", 1_000_000),),
    eligibility=EligibilityPolicy())
KEYS = 500  # each sent to both nodes: 1,000 borrows
POOL = 4  # connections per node


class WatchedIn(FakeIn):
    """The fake IN, counting the credits in flight for one subscriber at once: with
    every decision on the latest committed state, a second loan is refused
    OPERATION_PENDING while one is being credited, so credits never overlap."""

    in_flight = 0
    in_flight_max = 0

    async def execute(self, op: InOperation) -> InResult:
        if op.action is not InAction.REFUND_ACCOUNT:
            return await super().execute(op)
        self.in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            await asyncio.sleep(0.002)  # the IN's answer takes a moment
            return await super().execute(op)
        finally:
            self.in_flight -= 1


async def test_two_nodes_lend_one_subscriber_within_his_ceiling_once_per_key() -> None:
    from extrabalance.ledger.postgres import PostgresLedger

    clock, fake_in = Clock(), WatchedIn()
    with fresh_schema("eb_two_nodes") as conninfo:
        ledgers = [PostgresLedger(conninfo, pool_max=POOL),
                   PostgresLedger(conninfo, pool_max=POOL, migrate=False)]
        nodes = [LendingService(ledger, fake_in, FakeNotifier(), ListEvents(), POLICY,
                                Router(ROUTES), clock, locks=SubscriberLocks())
                 for ledger in ledgers]
        try:
            await ledgers[0].write(lambda tx: tx.put_profile(
                SubscriberProfile(M, 400, 5000), datetime(2026, 1, 1, tzinfo=UTC)))
            work = [nodes[0].borrow(M, 1, "ussd", f"ussd:{n}") for n in range(KEYS)]
            work += [nodes[1].borrow(M, 1, "ussd", f"ussd:{n}") for n in reversed(range(KEYS))]
            outcomes = await asyncio.gather(*work)
            for node in nodes:
                await node.drain_sagas()

            loans = await ledgers[1].read(lambda tx: tx.conn.execute(
                "SELECT idempotency_key, state, principal_minor + fee_minor, loan_id"
                " FROM loans WHERE msisdn = %s", (M,)).fetchall())
            per_key = Counter(key for key, *_ in loans)
            assert per_key and max(per_key.values()) == 1, "a request key got two loans"
            assert {state for _, state, _, _ in loans} == {"ACTIVE"}
            owed = await ledgers[0].read(lambda tx: tx.debt_owed(M))
            assert owed <= CEILING
            assert owed == sum(total for *_, total, _ in loans) == CEILING // 110 * 110
            assert await ledgers[1].read(lambda tx: tx.debt_from_journal(M)) == owed
            assert fake_in.in_flight_max == 1, "two loans were credited at once"
            # the IN was credited once per loan, with the principal
            assert fake_in.credits_applied == len(loans)
            assert fake_in.balances.get(M, 0) == 100 * len(loans)
            granted = [o for o in outcomes if o.status is BorrowStatus.GRANTED]
            assert {o.loan_id for o in granted} == {loan_id for *_, loan_id in loans}
            # a key answered GRANTED on both nodes names the same loan on both
            for n in range(KEYS):
                a, b = outcomes[n], outcomes[2 * KEYS - 1 - n]
                if a.loan_id and b.loan_id:
                    assert a.loan_id == b.loan_id, f"ussd:{n}: two loans"
        finally:
            for node in nodes:
                await node.drain_sagas()
            for ledger in ledgers:
                await ledger.close()
