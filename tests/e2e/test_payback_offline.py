"""Recharges published while the node is down are all paid back, once, after it starts.

Real node, real IN simulator over Diameter, real Mosquitto (persistent session,
`max_queued_messages 0`): the broker holds the QoS 1 messages for the node's fixed
client id; after the restart every recharge is recovered exactly once and the
ledger agrees with what the IN debited.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from extrabalance.demo import demo_env
from extrabalance.ledger.profiles import import_profiles
from extrabalance.mosquitto import find_mosquitto
from extrabalance.node import Node
from extrabalance.service.outcomes import BorrowOutcome, BorrowStatus

COUNT = 1000
FIRST = 201003000000
BORROWS_AT_ONCE = 50  # the loans are the setup: made in waves the IN answers in time
# The SMS of 1,000 loans and 1,000 paybacks are not what this test checks; at the
# outbox's shipped rate (100/s) each stop would wait its full drain time for them.
SMS_PER_S = 10_000.0


@pytest.mark.skipif(find_mosquitto() is None, reason="needs Mosquitto (make test installs it)")
async def test_recharges_published_while_the_node_is_down(tmp_path):
    msisdns = [str(FIRST + i) for i in range(COUNT)]
    async with demo_env(tmp_path) as env:
        csv = tmp_path / "more.csv"
        csv.write_text("msisdn,tenure_days,arpu_minor\n" + "".join(f"{m},400,5000\n" for m in msisdns))
        assert not import_profiles(env.settings.storage.path, csv).bad_rows
        node = env.node
        node.outbox.rate_per_s = SMS_PER_S
        waves = asyncio.Semaphore(BORROWS_AT_ONCE)

        async def borrow(msisdn: str) -> BorrowOutcome:
            async with waves:
                return await node.lending.borrow(msisdn, 4, "sms", f"offline-{msisdn}")

        outcomes = await asyncio.gather(*(borrow(m) for m in msisdns))
        # On a busy machine an answer can come after the IN request timeout: that loan
        # is PENDING and the resolver's follow-up settles it; every loan must end ACTIVE.
        assert {o.status for o in outcomes} <= {BorrowStatus.GRANTED, BorrowStatus.PENDING}
        await node.resolver.drain_follow_ups()
        active = await node.ledger.read(lambda c: c.execute(
            "SELECT COUNT(*) FROM loans WHERE state = 'ACTIVE'").fetchone()[0])
        assert active == COUNT
        for m in msisdns:
            env.in_sim.spend(m)  # the credit is used up: only recharges can pay back
        await node.stop()

        for m in msisdns:  # 10.00 each: more than the 5.50 owed
            await env.in_sim.recharge(m, 1000)

        node = Node(env.settings)
        node.outbox.rate_per_s = SMS_PER_S
        await node.start()
        try:
            deadline = time.monotonic() + 60
            while True:
                done = await node.ledger.read(lambda c: c.execute(
                    "SELECT COUNT(*), COUNT(DISTINCT event_id), COALESCE(SUM(recovered_minor), 0)"
                    " FROM recoveries WHERE state = 'DONE'").fetchone())
                if done[0] >= COUNT or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert done[0] == COUNT and done[1] == COUNT  # every event once
            assert done[2] == COUNT * 550
            debits = [op for op in env.in_sim.applied()
                      if op.action == "DIRECT_DEBITING" and op.result_code == 2001]
            assert len(debits) == COUNT and sum(op.amount_minor for op in debits) == COUNT * 550
            assert {env.in_sim.balance(m) for m in msisdns} == {450}
            totals = await node.ledger.account_totals()
            assert sum(totals.values()) == 0
            assert totals.get("principal_receivable", 0) + totals.get("fee_receivable", 0) == 0
        finally:
            await node.stop()
