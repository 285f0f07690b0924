"""Overload: above its bounds the node says "busy" at once instead of queueing.

Diameter: GyServer lets at most `inflight_max` out-of-balance CCRs into the lending
service, and at most `per_subscriber_max` for one MSISDN; the next get 3004
DIAMETER_TOO_BUSY with the E bit, and the lending service (hence the ledger) never
sees them. An admitted request not decided within `deadline_ms` gets 3004 too, while
its decision runs on. SMPP: SmppChannel handles at most
`inbound_tasks_max` deliver_sm at once; the next get ESME_RTHROTTLED and the gateway
re-sends. Both over loopback with the real Diameter and SMPP stacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import pytest

from extrabalance.adapters.gy_server import GyServer
from extrabalance.adapters.smpp_channel import SmppChannel
from extrabalance.adapters.sms_notifier import SmsNotifier
from extrabalance.config import load_settings
from extrabalance.diameter import codec, gy
from extrabalance.diameter.aio.node import DiameterNode, PeerAddress
from extrabalance.diameter.peer import LocalIdentity
from extrabalance.service.outcomes import AdvanceDecision, AdvanceOutcome
from extrabalance.service.templates import Templates
from extrabalance.service.ussd import UssdDialogs
from extrabalance.smpp.aio.client import BindConfig, Esme
from extrabalance.smpp.aio.server import Smsc
from extrabalance.smpp.pdu import DeliverSm, Status

NODE = LocalIdentity("eb.operator.example", "operator.example")
IN_A = LocalIdentity("in-a.operator.example", "operator.example")
INFLIGHT_MAX = 4
BURST = 12


class BlockedLending:
    """Out-of-balance decisions that wait until released (a slow ledger)."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.borrows = 0

    async def out_of_balance(self, *args: Any, **kwargs: Any) -> AdvanceOutcome:
        self.calls += 1
        await self.release.wait()
        return AdvanceOutcome(AdvanceDecision.NO_ADVANCE)

    async def borrow(self, *args: Any) -> None:
        self.borrows += 1
        await self.release.wait()

    async def sms_loan(self, msisdn: str, tier_id: int | None, key: str) -> None:
        await self.borrow(msisdn, tier_id, "sms", key)


@contextlib.asynccontextmanager
async def gy_pair(lending: BlockedLending, inflight_max: int) -> Any:
    gy_server = GyServer(lending, origin_host=NODE.origin_host, origin_realm=NODE.origin_realm,
                         service_context_id="extrabalance@3gpp.org", currency_numeric=818,
                         currency_exponent=2, inflight_max=inflight_max,
                         deadline_ms=60_000)  # this test releases the requests itself
    node = DiameterNode(NODE, allowed_peers={IN_A.origin_host}, request_handler=gy_server)
    port = await node.listen("127.0.0.1", 0)

    async def no_requests(msg: codec.Message, peer: str) -> codec.Message:
        raise AssertionError("the node sends the IN nothing here")

    in_side = DiameterNode(IN_A, allowed_peers={NODE.origin_host}, request_handler=no_requests)
    in_side.add_peer_group("node", NODE.origin_realm,
                           [PeerAddress("127.0.0.1", port, NODE.origin_host)])
    await in_side.wait_ready("node", 5)
    try:
        yield gy_server, in_side
    finally:
        lending.release.set()
        await in_side.close()
        await node.close()


def ccr(i: int) -> codec.Message:
    return gy.build_ccr(gy.CreditControlRequest(
        session_id=f"{IN_A.origin_host};overload;{i}", origin_host=IN_A.origin_host,
        origin_realm=IN_A.origin_realm, destination_realm=NODE.origin_realm,
        request_type=4, request_number=0, msisdn=f"2010001{i:05d}"))


async def test_gy_answers_3004_at_once_beyond_the_bound_and_never_reaches_the_ledger() -> None:
    lending = BlockedLending()
    async with gy_pair(lending, INFLIGHT_MAX) as (gy_server, in_side):
        tasks = [asyncio.create_task(in_side.request("node", ccr(i))) for i in range(BURST)]
        done, pending = await _wait_count(tasks, BURST - INFLIGHT_MAX)
        busy = [t.result() for t in done]
        assert len(busy) == BURST - INFLIGHT_MAX
        for answer in busy:
            assert answer.get(268) == 3004
            assert answer.flags & codec.FLAG_ERROR
            assert answer.first(431) is None  # nothing granted
        assert lending.calls == INFLIGHT_MAX
        assert gy_server.inflight == INFLIGHT_MAX
        assert gy_server.stats["too_busy"] == BURST - INFLIGHT_MAX
        lending.release.set()
        rest = await asyncio.gather(*pending)
        assert [a.get(268) for a in rest] == [4012] * INFLIGHT_MAX
        assert gy_server.inflight == 0
        # the bound frees up: the next request goes through again
        lending.release.clear()
        nxt = asyncio.create_task(in_side.request("node", ccr(99)))
        await _until(lambda: lending.calls == INFLIGHT_MAX + 1)
        lending.release.set()
        assert (await nxt).get(268) == 4012


async def _wait_count(tasks: list[asyncio.Task[Any]], n: int) -> tuple[set[Any], set[Any]]:
    """Until n of the tasks are done (the rest stay blocked in the lending service)."""
    async with asyncio.timeout(10):
        while sum(t.done() for t in tasks) < n:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # nothing else completes on its own
    done = {t for t in tasks if t.done()}
    return done, {t for t in tasks if not t.done()}


async def _until(cond: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.01)


def gy_alone(lending: Any, **bounds: Any) -> GyServer:
    return GyServer(lending, origin_host=NODE.origin_host, origin_realm=NODE.origin_realm,
                    service_context_id="extrabalance@3gpp.org", currency_numeric=818,
                    currency_exponent=2, **bounds)


def one_subscriber_ccr(i: int) -> codec.Message:
    return gy.build_ccr(gy.CreditControlRequest(
        session_id=f"{IN_A.origin_host};same;{i}", origin_host=IN_A.origin_host,
        origin_realm=IN_A.origin_realm, destination_realm=NODE.origin_realm,
        request_type=4, request_number=0, msisdn="201000100001"))


async def test_gy_answers_3004_beyond_the_per_subscriber_bound() -> None:
    lending = BlockedLending()
    gy_server = gy_alone(lending, inflight_max=100, per_subscriber_max=2, deadline_ms=60_000)
    calls = [asyncio.create_task(gy_server(one_subscriber_ccr(i), IN_A.origin_host))
             for i in range(5)]
    done, pending = await _wait_count(calls, 3)
    assert [t.result().get(268) for t in done] == [3004] * 3
    assert all(t.result().flags & codec.FLAG_ERROR for t in done)
    assert lending.calls == 2
    assert gy_server.stats["too_busy_subscriber"] == 3
    # another subscriber is not held back by the busy one
    other = asyncio.create_task(gy_server(ccr(7), IN_A.origin_host))
    await _until(lambda: lending.calls == 3)
    lending.release.set()
    assert [(await t).get(268) for t in (*pending, other)] == [4012] * 3
    assert gy_server.inflight == 0


class LateGrant:
    """Decides only when released, then grants: an advance that outlived its answer."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.finished = asyncio.Event()

    async def out_of_balance(self, *args: Any, **kwargs: Any) -> AdvanceOutcome:
        try:
            await self.release.wait()
            return AdvanceOutcome(AdvanceDecision.ADVANCED, 500)
        finally:
            self.finished.set()


async def test_every_out_of_balance_ccr_is_answered_by_the_deadline_without_cancelling() -> None:
    lending = LateGrant()
    gy_server = gy_alone(lending, answer_deadline_ms=10, deadline_ms=50)
    answer = await asyncio.wait_for(gy_server(ccr(1), IN_A.origin_host), 5)
    assert answer.get(268) == 3004
    assert answer.flags & codec.FLAG_ERROR
    assert answer.first(431) is None  # nothing granted in the answer
    assert gy_server.stats["past_deadline"] == 1
    # the decision was not cancelled: it still holds its place in the bound
    assert not lending.finished.is_set()
    assert gy_server.inflight == 1
    lending.release.set()
    await asyncio.wait_for(lending.finished.wait(), 5)
    await _until(lambda: gy_server.inflight == 0)
    # a grant that landed after the 3004 is reported, never silent
    assert gy_server.stats["late_advance_booked"] == 1


async def test_a_decision_in_time_is_answered_normally() -> None:
    lending = BlockedLending()
    lending.release.set()
    gy_server = gy_alone(lending, answer_deadline_ms=10, deadline_ms=5_000)
    answer = await gy_server(ccr(2), IN_A.origin_host)
    assert answer.get(268) == 4012
    assert gy_server.stats["past_deadline"] == 0
    assert gy_server.inflight == 0


def test_the_answer_deadline_is_never_shorter_than_the_advance_budget() -> None:
    with pytest.raises(ValueError):
        gy_alone(BlockedLending(), answer_deadline_ms=1000, deadline_ms=500)
    assert gy_alone(BlockedLending(), answer_deadline_ms=1000)._answer_by_s == 3.0


def test_gy_server_refuses_a_zero_bound() -> None:
    with pytest.raises(ValueError):
        GyServer(BlockedLending(), origin_host="a", origin_realm="b", service_context_id="c",
                 currency_numeric=818, currency_exponent=2, inflight_max=0)


# --- SMPP ---------------------------------------------------------------------------------

INBOUND_MAX = 3


async def test_smpp_channel_throttles_beyond_its_bound_and_the_bind_stays_up() -> None:
    settings = load_settings()
    policy = settings.policy()
    templates = Templates(settings.templates, "en", 2)
    lending = BlockedLending()
    dialogs = UssdDialogs(lending, templates, ussd_code="*123#", timeout_s=60, dialogs_max=10,
                          node_name="t")
    sent: list[Any] = []

    async def send_sms(*args: Any, **kw: Any) -> list[Any]:
        sent.append(args)
        return []

    async def submit(pdu: Any, **_: Any) -> None:
        return None

    channel = SmppChannel(dialogs=dialogs, lending=lending, templates=templates, policy=policy,
                          submit=submit,
                          sms=SmsNotifier(send_sms, templates=templates, short_code="1234"),
                          inbound_tasks_max=INBOUND_MAX)
    password = os.urandom(3).hex()

    async def on_submit(pdu: Any, system_id: str) -> tuple[int, str]:
        return 0, "m1"

    smsc = Smsc(credentials={"eb": password}, on_submit=on_submit)
    port = await smsc.listen("127.0.0.1", 0)
    esme = Esme([BindConfig("127.0.0.1", port, "eb", password)], on_deliver=channel.on_deliver)
    await esme.start()
    try:
        await esme.wait_bound(5)

        def loan(i: int) -> DeliverSm:
            return DeliverSm(source_addr=f"20100020{i:04d}", destination_addr="1234",
                             short_message=b"LOAN 5")

        statuses = [await smsc.deliver(loan(i)) for i in range(INBOUND_MAX + 4)]
        assert statuses[:INBOUND_MAX] == [0] * INBOUND_MAX
        assert statuses[INBOUND_MAX:] == [Status.ESME_RTHROTTLED] * 4
        assert channel.inflight == INBOUND_MAX
        assert lending.borrows == INBOUND_MAX  # the throttled ones never reached lending
        assert channel.stats["throttled"] == 4
        assert esme.bind_states()[0]["bound"]
        lending.release.set()
        await _until(lambda: channel.inflight == 0)
        assert await smsc.deliver(loan(50)) == 0  # room again: accepted
    finally:
        lending.release.set()
        await channel.drain(2)
        await esme.close()
        await smsc.close()


def test_smpp_channel_refuses_a_zero_bound() -> None:
    settings = load_settings()
    templates = Templates(settings.templates, "en", 2)
    with pytest.raises(ValueError):
        SmppChannel(dialogs=None, lending=None, templates=templates,  # type: ignore[arg-type]
                    policy=settings.policy(), submit=None,  # type: ignore[arg-type]
                    sms=None, inbound_tasks_max=0)  # type: ignore[arg-type]
