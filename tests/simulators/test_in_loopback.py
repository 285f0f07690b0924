"""The IN simulator over real Diameter connections on 127.0.0.1.

A tiny "node" written here with the shared DiameterNode plays the Extra Balance node:
as a client it sends balance operations to the simulated IN nodes; as a server it
answers the IN's out-of-balance requests (grants 300 to one subscriber, 4012 to the
others).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from extrabalance.diameter import codec, gy
from extrabalance.diameter.aio.node import DiameterNode, LocalIdentity, PeerAddress, RequestTimeout
from simulators.in_node import InNodeSpec, InSimulator, MsisdnRange, NodePeer

NODE_HOST = "eb.test"
REALM = "test"
SUB_A = "201000000001"
SUB_B = "201100000001"
LUCKY = "201000000777"  # the fake node grants him an advance
SLOW = "201000000778"  # ... and him too, but answers after 200 ms
TIMEOUT_S = 5.0


@dataclass
class FakeNode:
    diameter: DiameterNode
    port: int
    oob_requests: list[gy.CreditControlRequest]
    sessions: int = 0
    wire: list[tuple[int, bool]] = field(default_factory=list)

    def ccr(
        self, action: int, amount: int, msisdn: str = SUB_A, *, dest: str = "in-a.test",
        session: str | None = None, number: int = 0, retransmit: bool = False,
    ) -> codec.Message:
        if session is None:
            self.sessions += 1
            session = f"{NODE_HOST};1;{self.sessions}"
        return gy.build_ccr(
            gy.CreditControlRequest(
                session_id=session, origin_host=NODE_HOST, origin_realm=REALM,
                destination_realm=REALM, destination_host=dest, request_number=number,
                msisdn=msisdn, requested_action=action, requested_minor=amount,
                currency_numeric=818,
            ),
            retransmit=retransmit,
        )

    async def ask(self, msg: codec.Message, group: str = "in-a", **kw: int) -> gy.CreditControlAnswer:
        return gy.parse_cca(await self.diameter.request(group, msg, **kw))


@pytest.fixture
async def stack() -> AsyncIterator[tuple[InSimulator, FakeNode]]:
    oob: list[gy.CreditControlRequest] = []
    wire: list[tuple[int, bool]] = []  # (End-to-End id, T flag) of each out-of-balance CCR

    async def node_handler(msg: codec.Message, peer: str) -> codec.Message:
        ccr = gy.parse_ccr(msg)
        oob.append(ccr)
        wire.append((msg.end_to_end_id, msg.is_retransmit))
        if ccr.msisdn == SLOW:
            await asyncio.sleep(0.2)
        if ccr.msisdn in (LUCKY, SLOW):
            return gy.build_cca(msg, NODE_HOST, REALM, 2001, 300,
                                currency_numeric=818, currency_exponent=2)
        return gy.build_cca(msg, NODE_HOST, REALM, 4012, currency_numeric=818,
                            currency_exponent=2)

    node = DiameterNode(
        LocalIdentity(NODE_HOST, REALM), allowed_peers=None, request_handler=node_handler,
        watchdog_s=0.4, request_timeout_ms=1000, reconnect_min_s=0.05, reconnect_max_s=0.2,
    )
    node_port = await node.listen("127.0.0.1", 0)
    sim = InSimulator(
        [
            InNodeSpec("in-a", "in-a.test", REALM, ranges=(MsisdnRange.parse("2010*"),)),
            InNodeSpec("in-b", "in-b.test", REALM, ranges=(MsisdnRange.parse("2011*"),)),
        ],
        NodePeer("127.0.0.1", node_port, NODE_HOST, REALM),
        seed=7,
    )
    ports = await sim.start()
    for name, port in ports.items():
        node.add_peer_group(name, REALM, [PeerAddress("127.0.0.1", port, f"{name}.test")])
    await node.wait_ready("in-a", TIMEOUT_S)
    await node.wait_ready("in-b", TIMEOUT_S)
    await sim.wait_connected(TIMEOUT_S)
    try:
        fake = FakeNode(node, node_port, oob)
        fake.wire = wire
        yield sim, fake
    finally:
        await node.close()
        await sim.close()


async def test_duplicates_with_and_without_t_flag_are_answered_first_and_applied_once(
    stack: tuple[InSimulator, FakeNode],
) -> None:
    sim, node = stack
    msg = node.ccr(gy.REFUND_ACCOUNT, 500, session="eb.test;9;9")
    first = await node.ask(msg)
    plain_repeat = await node.ask(node.ccr(gy.REFUND_ACCOUNT, 500, session="eb.test;9;9"))
    t_repeat = await node.ask(node.ccr(gy.REFUND_ACCOUNT, 500, session="eb.test;9;9",
                                       retransmit=True))
    assert first.result_code == plain_repeat.result_code == t_repeat.result_code == 2001
    assert sim.balance(SUB_A) == 500
    assert [e.session_id for e in sim.applied()] == ["eb.test;9;9"]
    assert sim.stats["in-a"]["duplicates"] == 2


async def test_balance_operations_over_the_wire(stack: tuple[InSimulator, FakeNode]) -> None:
    sim, node = stack
    sim.set_balance(SUB_A, 400)
    check = await node.ask(node.ccr(gy.CHECK_BALANCE, 400))
    assert (check.result_code, check.check_balance_result) == (2001, gy.ENOUGH_CREDIT)
    short = await node.ask(node.ccr(gy.DIRECT_DEBITING, 401))
    assert (short.result_code, short.is_error) == (4012, False)
    debit = await node.ask(node.ccr(gy.DIRECT_DEBITING, 150))
    assert (debit.result_code, debit.granted_minor, debit.origin_host) == (2001, 150, "in-a.test")
    unknown = await node.ask(node.ccr(gy.REFUND_ACCOUNT, 100, msisdn=SUB_B))
    assert unknown.result_code == 5030
    on_b = await node.ask(node.ccr(gy.REFUND_ACCOUNT, 100, msisdn=SUB_B, dest="in-b.test"), "in-b")
    assert (on_b.result_code, on_b.origin_host) == (2001, "in-b.test")
    assert sim.balances() == {SUB_A: 250, SUB_B: 100}


async def test_dropped_answer_applied_and_the_t_retry_gets_the_first_answer(
    stack: tuple[InSimulator, FakeNode],
) -> None:
    sim, node = stack
    sim.set_drop_share(1.0, "in-a")
    with pytest.raises(RequestTimeout):
        await node.ask(node.ccr(gy.REFUND_ACCOUNT, 500, session="eb.test;7;7"), timeout_ms=200)
    assert sim.balance(SUB_A) == 500  # applied, never answered
    sim.set_drop_share(0.0, "in-a")
    retry = await node.ask(node.ccr(gy.REFUND_ACCOUNT, 500, session="eb.test;7;7", retransmit=True))
    assert retry.result_code == 2001
    assert sim.balance(SUB_A) == 500
    assert sim.stats["in-a"]["dropped"] == 1


async def test_busy_and_unable_to_deliver_are_not_applied(stack: tuple[InSimulator, FakeNode]) -> None:
    sim, node = stack
    for code in (3004, 3002):
        sim.set_result_share(code, 1.0)
        refused = await node.ask(node.ccr(gy.REFUND_ACCOUNT, 500, session=f"s{code}"))
        assert (refused.result_code, refused.is_error) == (code, True)
        sim.set_result_share(code, 0.0)
        assert sim.balance(SUB_A) == 0
        again = await node.ask(node.ccr(gy.REFUND_ACCOUNT, 500, session=f"s{code}"))
        assert again.result_code == 2001
        sim.set_balance(SUB_A, 0)


async def test_forced_refusals_for_a_subscriber(stack: tuple[InSimulator, FakeNode]) -> None:
    sim, node = stack
    for code in (4012, 5030, 4010):
        sim.force_result(SUB_A, code)
        answer = await node.ask(node.ccr(gy.REFUND_ACCOUNT, 500))
        assert (answer.result_code, answer.is_error) == (code, False)
    sim.force_result(SUB_A, None)
    assert sim.balance(SUB_A) == 0


async def test_answer_delay(stack: tuple[InSimulator, FakeNode]) -> None:
    sim, node = stack
    sim.set_delay(400, "in-a")
    with pytest.raises(RequestTimeout):
        await node.ask(node.ccr(gy.CHECK_BALANCE, 1), timeout_ms=100)
    sim.set_delay(0)
    assert (await node.ask(node.ccr(gy.CHECK_BALANCE, 1))).result_code == 2001


async def test_disconnect_and_reconnect(stack: tuple[InSimulator, FakeNode]) -> None:
    sim, node = stack
    closed = await sim.disconnect("in-a")
    assert closed >= 1
    async with asyncio.timeout(TIMEOUT_S):
        while True:  # the node redials by itself
            try:
                answer = await node.ask(node.ccr(gy.CHECK_BALANCE, 1))
                break
            except Exception:  # noqa: BLE001 - not reconnected yet
                await asyncio.sleep(0.05)
    assert answer.result_code == 2001
    assert sim.stats["in-a"]["disconnects"] == 1


def _state(node: FakeNode, group: str) -> str:
    return next(r["state"] for r in node.diameter.peer_states() if r["group"] == group)


async def test_silent_watchdog_makes_the_peer_fail(stack: tuple[InSimulator, FakeNode]) -> None:
    sim, node = stack
    sim.set_silent_watchdog(True, "in-a")
    async with asyncio.timeout(TIMEOUT_S):
        while _state(node, "in-a") == "Open":  # suspect, then down (node's Tw is 0.4 s)
            await asyncio.sleep(0.05)
    assert _state(node, "in-b") == "Open"
    sim.set_silent_watchdog(False, "in-a")
    await node.diameter.wait_ready("in-a", TIMEOUT_S)


async def test_out_of_balance_grant_is_added_to_the_balance(
    stack: tuple[InSimulator, FakeNode],
) -> None:
    sim, node = stack
    sim.set_balance(LUCKY, 40)
    result, granted = await sim.run_out(LUCKY)
    assert (result, granted) == (2001, 300)
    assert sim.balance(LUCKY) == 300
    assert node.oob_requests[-1].origin_host == "in-a.test"
    assert node.oob_requests[-1].request_type == gy.EVENT_REQUEST
    assert sim.applied()[-1].action == "OUT_OF_BALANCE_GRANT"
    refused = await sim.send_out_of_balance(SUB_B, requested_minor=200)
    assert refused == (4012, None)
    assert node.oob_requests[-1].origin_host == "in-b.test"
    assert node.oob_requests[-1].requested_minor == 200
    assert sim.balance(SUB_B) == 0


async def test_advance_confirmation_after_the_cca_is_a_duplicate(
    stack: tuple[InSimulator, FakeNode],
) -> None:
    sim, node = stack
    sim.accounts["in-a"].confirmation_extension = True  # the opt-in extension
    result, granted = await sim.send_out_of_balance(
        LUCKY, session_id="in-a.test;77;1", request_number=3)
    assert (result, granted) == (2001, 300) and sim.balance(LUCKY) == 300
    # The node confirms the advance with its own Session-Id and CC-Request-Number.
    confirm = node.ccr(gy.REFUND_ACCOUNT, 300, LUCKY, session="in-a.test;77;1", number=3)
    assert (await node.ask(confirm)).result_code == 2001
    assert sim.balance(LUCKY) == 300  # credited once
    assert [a.action for a in sim.applied()] == ["OUT_OF_BALANCE_GRANT"]


async def test_late_cca_is_discarded_and_the_confirmation_credits(
    stack: tuple[InSimulator, FakeNode],
) -> None:
    sim, node = stack
    sim.accounts["in-a"].confirmation_extension = True  # the opt-in extension
    # The IN gives up after 50 ms (its DiameterNode's own timer is longer: the answer
    # slips in after the deadline, before the timer tick, and must still be ignored).
    sim.request_timeout_ms = 50
    sim.oob_resends_max = 0  # no re-send: the confirmation is what credits it
    with pytest.raises(RequestTimeout):
        await sim.send_out_of_balance(SLOW, session_id="in-a.test;78;1")
    assert sim.balance(SLOW) == 0 and sim.stats["in-a"]["oob_late_discarded"] == 1
    confirm = node.ccr(gy.REFUND_ACCOUNT, 300, SLOW, session="in-a.test;78;1")
    assert (await node.ask(confirm)).result_code == 2001
    assert sim.balance(SLOW) == 300
    again = node.ccr(gy.REFUND_ACCOUNT, 300, SLOW, session="in-a.test;78;1", retransmit=True)
    assert (await node.ask(again)).result_code == 2001
    assert sim.balance(SLOW) == 300


async def test_strict_in_resends_a_late_ccr_with_t_and_the_same_end_to_end_id(
    stack: tuple[InSimulator, FakeNode],
) -> None:
    """RFC 6733 §5.5.4: the strict IN (the default) discards an answer after its timer
    and re-sends the same CCR with the T flag and the same End-to-End id; a REFUND
    under its own Session-Id is a second credit there (no private rule)."""
    sim, node = stack
    sim.request_timeout_ms = 50
    result, granted = await sim.send_out_of_balance(SLOW, session_id="in-a.test;79;1")
    # The first answer came after 200 ms and was discarded; the re-send (T, same
    # End-to-End id) was answered at once from the node's duplicate cache, which
    # matches on (Origin-Host, End-to-End id): the handler ran once.
    assert (result, granted) == (2001, 300) and sim.balance(SLOW) == 300
    assert node.wire == [(node.wire[0][0], False)]
    stats = sim.stats["in-a"]
    assert stats["oob_late_discarded"] == 1 and stats["oob_resent_t_flag"] == 1
    result, granted = await sim.send_out_of_balance(LUCKY, session_id="in-a.test;79;2")
    assert (result, granted) == (2001, 300) and sim.balance(LUCKY) == 300
    refund = node.ccr(gy.REFUND_ACCOUNT, 300, LUCKY, session="in-a.test;79;2")
    assert (await node.ask(refund)).result_code == 2001
    assert sim.balance(LUCKY) == 600
    assert sim.nonstandard()["nonstandard_refund_own_session"] == 1


async def test_a_dropped_answer_then_a_t_resend_with_the_same_end_to_end_id_is_answered(
    stack: tuple[InSimulator, FakeNode],
) -> None:
    """RFC 6733 §5.5.4: the re-send keeps the End-to-End id; the IN must answer it with
    the first answer even though its handler dropped the first copy's answer (the
    duplicate cache used to hold that copy's never-resolved future: no answer ever)."""
    sim, node = stack
    msg = node.ccr(gy.REFUND_ACCOUNT, 400, session="eb.test;9;10")._replace(end_to_end_id=0x5151)
    sim.set_drop_share(1.0)
    with pytest.raises(RequestTimeout):
        await node.ask(msg, timeout_ms=300)
    sim.set_drop_share(0.0)
    again = await node.ask(msg.with_flags(codec.FLAG_RETRANSMIT), timeout_ms=2000)
    assert again.result_code == 2001 and sim.balance(SUB_A) == 400
    assert sim.stats["in-a"]["duplicates"] == 1
