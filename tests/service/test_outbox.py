"""The transactional outbox: messages that report money are written with the money and
sent by `OutboxSender` afterwards, so a slow SMSC never holds an answer, and a node
that stops between the commit and the send sends the message after restart."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from extrabalance.adapters.gy_server import GyServer
from extrabalance.diameter import gy
from extrabalance.service.lending import LendingService
from extrabalance.service.outbox import OutboxSender
from extrabalance.service.outcomes import BorrowStatus
from extrabalance.service.ports import Notice
from tests.service.fakes import FakeNotifier, Harness


@pytest.fixture
def h(h_sqlite):
    """SQLite only: these cases read the SQLite outbox table itself (the outbox operations run on every ledger in tests/ledger/test_unit_of_work_contract.py)."""
    return h_sqlite


IN_A = "in-a.operator.example"
SUBSCRIBERS = [f"2010012{i:05d}" for i in range(8)]


@dataclass
class StalledSmsc:
    """An SMSC that takes submit_sm but answers only when released (the 10-second
    SMSC of the issue, without waiting 10 seconds)."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0
    delivered: list[Notice] = field(default_factory=list)

    async def notify(self, notice: Notice) -> None:
        self.waiting += 1
        await self.release.wait()
        self.delivered.append(notice)


def sender_over(h: Harness, notifier: Any, **bounds: Any) -> OutboxSender:
    return OutboxSender(h.ledger, notifier, h.clock, monotonic=asyncio.get_running_loop().time,
                        **bounds)


def lending_over(h: Harness, outbox: OutboxSender) -> LendingService:
    return LendingService(h.ledger, h.fake_in, outbox, h.events, h.policy, h.router, h.clock,
                          locks=h.locks)


def out_of_balance_ccr(i: int, msisdn: str) -> Any:
    return gy.build_ccr(gy.CreditControlRequest(
        session_id=f"{IN_A};outbox;{i}", origin_host=IN_A, origin_realm="operator.example",
        destination_realm="operator.example", request_type=4, request_number=0,
        msisdn=msisdn))


async def test_a_stalled_smsc_holds_no_cca_and_every_sms_leaves_when_it_answers(h):
    smsc = StalledSmsc()
    outbox = sender_over(h, smsc, concurrency_max=3)
    lending = lending_over(h, outbox)
    for msisdn in SUBSCRIBERS:
        await h.add_profile(msisdn)
        await lending.set_preferences(msisdn, auto_advance=True)
    gy_server = GyServer(lending, origin_host="eb.operator.example",
                         origin_realm="operator.example",
                         service_context_id="extrabalance@3gpp.org", currency_numeric=818,
                         currency_exponent=2)
    outbox.start()
    try:
        answers = [await asyncio.wait_for(gy_server(out_of_balance_ccr(i, m), IN_A), 30)
                   for i, m in enumerate(SUBSCRIBERS)]
        assert [a.get(268) for a in answers] == [2001] * len(SUBSCRIBERS)
        assert gy_server.stats["past_deadline"] == 0
        assert gy_server.stats["late_advance_booked"] == 0
        # The SMSC holds at most `concurrency_max` submits; nothing was delivered yet.
        assert smsc.delivered == [] and outbox.in_flight <= 3
        smsc.release.set()
        await outbox.drain()
    finally:
        await outbox.stop()
    assert sorted(n.msisdn for n in smsc.delivered) == sorted(SUBSCRIBERS)
    assert {n.template for n in smsc.delivered} == {"advance_granted"}
    assert len({n.outbox_id for n in smsc.delivered}) == len(SUBSCRIBERS)
    assert await h.ledger.read(lambda tx: tx.outbox_due(h.clock(), 100)) == []


async def test_a_message_committed_before_a_crash_is_sent_after_restart(h):
    await h.add_profile(SUBSCRIBERS[0])
    never_started = sender_over(h, FakeNotifier())  # the node dies before it sends
    out = await lending_over(h, never_started).borrow(SUBSCRIBERS[0], 4, "ussd", "ussd:d1:x")
    assert out.status is BorrowStatus.GRANTED
    await h.restart()  # the process is gone; the ledger is reopened
    smsc = FakeNotifier()
    outbox = sender_over(h, smsc)
    outbox.start()
    try:
        await outbox.drain()
    finally:
        await outbox.stop()
    assert [(n.msisdn, n.template, dict(n.params)) for n in smsc.delivered] == [
        (SUBSCRIBERS[0], "loan_granted", {"amount": 1000, "fee": 100, "debt": 1100})]
    assert smsc.delivered[0].outbox_id is not None
    # Marked sent: a second start sends nothing again.
    again = FakeNotifier()
    await sender_over(h, again).drain()
    assert again.delivered == []


async def test_a_send_cut_short_is_sent_again_with_the_same_outbox_id(h):
    await h.add_profile(SUBSCRIBERS[0])
    outbox = sender_over(h, StalledSmsc())
    await lending_over(h, outbox).borrow(SUBSCRIBERS[0], 4, "ussd", "ussd:d1:x")
    outbox.start()
    while outbox.in_flight == 0:
        await asyncio.sleep(0)
    await outbox.stop()  # abrupt stop while the submit is unanswered
    (first_id,) = [r.outbox_id for r in await h.ledger.read(
        lambda tx: tx.outbox_due(h.clock(), 10))]
    smsc = FakeNotifier()
    await sender_over(h, smsc).drain()
    assert [n.outbox_id for n in smsc.delivered] == [first_id]


async def test_smsc_refusals_are_retried_with_backoff_and_never_lost(h):
    await h.add_profile(SUBSCRIBERS[0])
    smsc = FakeNotifier(broken=True)
    outbox = sender_over(h, smsc, retry_delays_s=(30.0,))
    await lending_over(h, outbox).borrow(SUBSCRIBERS[0], 4, "ussd", "ussd:d1:x")
    await outbox.drain()
    assert smsc.delivered == [] and outbox.stats["failed_attempts"] == 1
    # Not due again before its backoff ends.
    assert await h.ledger.read(lambda tx: tx.outbox_due(h.clock(), 10)) == []
    smsc.broken = False
    h.clock.advance(seconds=31)
    await outbox.drain()
    assert [n.template for n in smsc.delivered] == ["loan_granted"]
    (row,) = await h.ledger.read(
        lambda tx: tx.execute("SELECT attempts, sent_at IS NOT NULL FROM outbox").fetchall())
    assert tuple(row) == (2, 1)


async def test_a_message_whose_mark_is_not_durable_yet_is_not_sent_twice(h):
    """The mark rides in the ledger's next batch (`write_later`): until it is durable
    the row still reads as due, and the sender skips it instead of sending it again."""
    h.ledger.writer.later_flush_s = 60.0  # only another write can carry the mark
    await h.add_profile(SUBSCRIBERS[0])
    smsc = FakeNotifier()
    outbox = sender_over(h, smsc)
    await lending_over(h, outbox).borrow(SUBSCRIBERS[0], 4, "ussd", "ussd:d1:x")
    assert await outbox.send_due() == 1
    while outbox.in_flight:
        await asyncio.sleep(0)
    assert len(await h.ledger.read(lambda tx: tx.outbox_due(h.clock(), 10))) == 1
    assert await outbox.send_due() == 0  # not durable yet: skipped, not sent again
    await outbox.drain()  # carries the mark in a batch of its own
    assert await h.ledger.read(lambda tx: tx.outbox_due(h.clock(), 10)) == []
    assert len(smsc.delivered) == 1
