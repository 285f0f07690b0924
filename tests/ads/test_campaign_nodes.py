"""Campaigns drained by several nodes on one PostgreSQL ledger: each node takes a page
of recipients with a claim (`claim_recipients`), so every recipient gets exactly one
SMS however the nodes interleave, and a node that dies with a page claimed leaves its
unsent recipients to another node once the claim runs out."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from typing import Any

from extrabalance.core import sagas
from extrabalance.service.ads import Advertiser
from extrabalance.service.campaign import CampaignService
from tests.ads.conftest import RULES, Ticks
from tests.service.fakes import FakeNotifier, Harness, ListEvents

RECIPIENTS = 60
PAGE = 4  # recipients per claim: many claims, so the two nodes interleave
LEASE_S = 60.0


def campaign_sms(*notifiers: FakeNotifier) -> Counter[str]:
    return Counter(n.msisdn for notifier in notifiers for n in notifier.sent
                   if n.template == "ad_campaign")


class Node:
    """One node's drainer: its own pool on the shared schema, Advertiser and SMSC."""

    def __init__(self, h: Harness, ledger: Any) -> None:
        self.notifier = FakeNotifier()
        self.ads = Advertiser(ledger, self.notifier, ListEvents(), h.policy, RULES, h.clock,
                              monotonic=Ticks())
        self.campaigns = CampaignService(ledger, self.ads, h.policy, h.clock,
                                         send_rate_max_per_s=1_000_000, batch_max=PAGE,
                                         claim_lease_s=LEASE_S)


async def two_nodes(tmp_path: Any) -> tuple[Harness, Node, Node, Any]:
    from extrabalance.ledger.postgres import PostgresLedger

    h = Harness(tmp_path / "unused.db", backend="postgresql")
    other = PostgresLedger(h._pg_conninfo, pool_max=4, migrate=False)  # type: ignore[arg-type]
    for i in range(RECIPIENTS):
        await h.add_profile(f"2010010{i:05d}")
    return h, Node(h, h.ledger), Node(h, other), other


async def drain_until_done(*nodes: Node) -> None:
    async def node_loop(node: Node) -> None:
        for _ in range(10 * RECIPIENTS):
            if await node.campaigns.drain_once() == 0:
                rows = await node.campaigns.list()
                if rows[0].state == sagas.CAMPAIGN_DONE:
                    return
                await asyncio.sleep(0.01)  # the other node still holds a page
        raise AssertionError("the campaign never finished")

    await asyncio.gather(*(node_loop(n) for n in nodes))


async def test_two_nodes_send_each_recipient_exactly_once(tmp_path: Any) -> None:
    h, a, b, other = await two_nodes(tmp_path)
    try:
        row = await a.campaigns.create("ad_campaign", None, None, "tester")
        assert row.recipients == RECIPIENTS
        await drain_until_done(a, b)
        sent = campaign_sms(a.notifier, b.notifier)
        assert len(sent) == RECIPIENTS and set(sent.values()) == {1}
        # both nodes took part (pages of 4 over 60 recipients, claimed in turn)
        assert campaign_sms(a.notifier) and campaign_sms(b.notifier)
        done = (await a.campaigns.list())[0]
        assert (done.state, done.sent, done.suppressed, done.pending) == (
            sagas.CAMPAIGN_DONE, RECIPIENTS, 0, 0)
    finally:
        await a.ads.drain()
        await b.ads.drain()
        await other.close()
        await h.close()


async def test_a_dead_nodes_page_goes_to_the_other_node_after_its_claim(tmp_path: Any) -> None:
    h, a, _b, other = await two_nodes(tmp_path)
    try:
        row = await a.campaigns.create("ad_campaign", None, None, "tester")
        # Node b claims a page and dies before sending any of it.
        now = h.clock()
        held = await other.write(lambda tx: tx.claim_recipients(
            row.campaign_id, now, now + timedelta(seconds=LEASE_S), PAGE))
        assert len(held) == PAGE
        for _ in range(RECIPIENTS):
            if await a.campaigns.drain_once() == 0:
                break
        sent = campaign_sms(a.notifier)
        assert len(sent) == RECIPIENTS - PAGE and not set(held) & set(sent)
        left = (await a.campaigns.list())[0]
        assert left.state != sagas.CAMPAIGN_DONE and left.pending == PAGE  # not done yet
        h.clock.advance(seconds=LEASE_S)  # b's claim ran out
        await drain_until_done(a)
        sent = campaign_sms(a.notifier)
        assert len(sent) == RECIPIENTS and set(sent.values()) == {1}
    finally:
        await a.ads.drain()
        await other.close()
        await h.close()
