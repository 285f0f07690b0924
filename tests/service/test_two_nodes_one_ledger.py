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
from datetime import UTC, datetime, timedelta

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


SUBSCRIBERS = [f"2010012{n:05d}" for n in range(12)]


async def test_a_dead_nodes_sagas_are_taken_over_once_when_its_lease_runs_out() -> None:
    """Node A leaves loans and paybacks with unknown outcomes (the IN's answers lost)
    and dies. While its lease runs, the resolvers of B and C leave them alone; once it
    ran out they race for them and each operation is re-sent once, by one of them, and
    settled once: the IN credited and debited exactly what the ledger says."""
    from extrabalance.ledger.postgres import PostgresLedger
    from extrabalance.service.ports import RechargeEvent
    from extrabalance.service.recovery import PaybackService
    from extrabalance.service.resolver import Resolver
    from tests.service.fakes import LOST_ANSWER

    clock, fake_in = Clock(), FakeIn()
    lease_s = 120.0
    with fresh_schema("eb_lease") as conninfo:
        node_a = PostgresLedger(conninfo, pool_max=2, node_name="node-a", saga_lease_s=lease_s)
        others = [PostgresLedger(conninfo, pool_max=2, migrate=False, node_name=name)
                  for name in ("node-b", "node-c")]
        try:
            lending = LendingService(node_a, fake_in, FakeNotifier(), ListEvents(), POLICY,
                                     Router(ROUTES), clock, locks=SubscriberLocks())
            payback = PaybackService(node_a, fake_in, FakeNotifier(), ListEvents(), POLICY,
                                     Router(ROUTES), clock, locks=SubscriberLocks())
            for m in SUBSCRIBERS:
                await node_a.write(lambda tx, m=m: tx.put_profile(SubscriberProfile(m, 400, 5000),
                                                                  clock()))
            half = len(SUBSCRIBERS) // 2
            # A: half the subscribers borrow and their credit's answer is lost ...
            for m in SUBSCRIBERS[:half]:
                fake_in.fail_next(LOST_ANSWER)
                await lending.borrow(m, 1, "ussd", f"ussd:{m}")
            # ... the other half borrow, then recharge, and the debit's answer is lost.
            for m in SUBSCRIBERS[half:]:
                await lending.borrow(m, 1, "ussd", f"ussd:{m}")
                fake_in.balances[m] = 1_000  # his balance after the recharge
                fake_in.fail_next(LOST_ANSWER)
                await payback.handle_recharge(RechargeEvent(f"ev-{m}", m, 1_000, "in-a", 1_000))
            await lending.drain_sagas()
            await node_a.close()  # node A dies
            sent_before = len(fake_in.calls)

            resolvers = [Resolver(ledger, fake_in, FakeNotifier(), ListEvents(), POLICY, clock,
                                  locks=SubscriberLocks(), node_name=ledger.node_name or "",
                                  lease_s=lease_s)
                         for ledger in others]
            clock.advance(seconds=lease_s - 1)  # A's lease still runs
            reports = await asyncio.gather(*(r.run_once() for r in resolvers))
            assert len(fake_in.calls) == sent_before and all(
                r.loans_settled == r.recoveries_settled == r.still_unknown == 0 for r in reports)

            clock.advance(seconds=2)  # A's lease ran out: B and C race for its sagas
            reports = await asyncio.gather(*(r.run_once() for r in resolvers))
            assert sum(r.loans_settled for r in reports) == half
            assert sum(r.recoveries_settled for r in reports) == len(SUBSCRIBERS) - half
            resent = Counter((op.session_id, op.request_number)
                             for op in fake_in.calls[sent_before:])
            assert len(resent) == len(SUBSCRIBERS) and set(resent.values()) == {1}
            assert all(op.retransmission for op in fake_in.calls[sent_before:])

            ledger = others[0]
            loans = await ledger.read(lambda tx: tx.conn.execute(
                "SELECT state, owner_node FROM loans ORDER BY msisdn").fetchall())
            recs = await ledger.read(lambda tx: tx.conn.execute(
                "SELECT state, recovered_minor, owner_node FROM recoveries").fetchall())
            assert [s for s, _ in loans[:half]] == ["ACTIVE"] * half
            assert [s for s, _ in loans[half:]] == ["REPAID"] * (len(SUBSCRIBERS) - half)
            assert {s for s, _, _ in recs} == {"DONE"}
            assert {owner for _, owner in loans[:half]} <= {"node-b", "node-c"}
            # The ledger and the IN agree: every credit once, every debit once.
            assert fake_in.credits_applied == len(SUBSCRIBERS)
            assert sum(r for _, r, _ in recs) == 110 * (len(SUBSCRIBERS) - half)
            for m in SUBSCRIBERS[half:]:
                assert fake_in.balances[m] == 1_000 - 110  # one debit of the 1.10 owed
            # A second pass finds nothing left to settle.
            again = await asyncio.gather(*(r.run_once() for r in resolvers))
            assert all(r.loans_settled == r.recoveries_settled == 0 for r in again)
        finally:
            for other in others:
                await other.close()


class HeldIn(FakeIn):
    """The fake IN, holding every re-sent request until `release` is set."""

    release: asyncio.Event
    held = 0  # re-sent requests waiting for the IN's answer

    async def execute(self, op: InOperation) -> InResult:
        if op.retransmission:
            self.held += 1
            await self.release.wait()
        return await super().execute(op)


async def test_a_long_resolver_run_keeps_its_lease_on_the_rows_it_has_not_reached() -> None:
    """Node B's resolver takes over two of dead node A's loans and re-sends them one at
    a time to an IN that answers slowly; its lease would run out meanwhile, so the run
    renews it: node C, claiming then, gets nothing, and each loan is re-sent once."""
    from extrabalance.ledger.postgres import PostgresLedger
    from extrabalance.service.resolver import Resolver
    from tests.service.fakes import LOST_ANSWER

    clock, fake_in = Clock(), HeldIn()
    fake_in.release = asyncio.Event()
    lease_s = 0.4  # renewed every 0.1 s of the run
    with fresh_schema("eb_renew") as conninfo:
        node_a = PostgresLedger(conninfo, pool_max=2, node_name="node-a", saga_lease_s=lease_s)
        node_b = PostgresLedger(conninfo, pool_max=2, migrate=False, node_name="node-b")
        node_c = PostgresLedger(conninfo, pool_max=2, migrate=False, node_name="node-c")
        try:
            lending = LendingService(node_a, fake_in, FakeNotifier(), ListEvents(), POLICY,
                                     Router(ROUTES), clock, locks=SubscriberLocks())
            for m in SUBSCRIBERS[:2]:
                await node_a.write(lambda tx, m=m: tx.put_profile(
                    SubscriberProfile(m, 400, 5000), clock()))
                fake_in.fail_next(LOST_ANSWER)
                await lending.borrow(m, 1, "ussd", f"ussd:{m}")
            await node_a.close()  # node A dies
            clock.advance(seconds=1)  # its lease ran out
            resolver_b = Resolver(node_b, fake_in, FakeNotifier(), ListEvents(), POLICY, clock,
                                  locks=SubscriberLocks(), node_name="node-b", lease_s=lease_s,
                                  concurrent_max=1)
            run = asyncio.create_task(resolver_b.run_once())
            for _ in range(1000):  # B has re-sent the first and waits for the IN
                if fake_in.held or run.done():
                    break
                await asyncio.sleep(0.01)
            assert fake_in.held == 1 and not run.done()
            clock.advance(seconds=1)  # B's first claim would have run out by now ...
            await asyncio.sleep(lease_s / 2)  # ... had B not renewed it since
            now = clock()
            taken = await node_c.write(lambda tx: tx.claim_unsettled_loans(
                "node-c", now, now + timedelta(seconds=lease_s), 10))
            assert taken == []
            fake_in.release.set()
            report = await run
            assert report.loans_settled == 2
            resent = Counter(op.session_id for op in fake_in.calls if op.retransmission)
            assert len(resent) == 2 and set(resent.values()) == {1}
        finally:
            fake_in.release.set()
            for ledger in (node_b, node_c):
                await ledger.close()
