"""The IN simulator in front of several Extra Balance nodes, over real Diameter on
127.0.0.1.

Two nodes are played by the shared DiameterNode, each with its own Origin-Host in one
realm. The IN dials both, spreads its out-of-balance CCRs over them, and when one
node's connection goes away with a CCR pending, re-sends that CCR to the other with
the T flag and the same End-to-End id (RFC 6733 §5.5.4); the grant is credited once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from extrabalance.diameter import codec, gy
from extrabalance.diameter.aio.node import DiameterNode, LocalIdentity, PeerAddress
from simulators.in_node import (
    InNodeSpec,
    InSimulator,
    MsisdnRange,
    NodePeer,
    _drop_connections,
    parse_node_peer_arg,
)

REALM = "test"
SUB = "201000000001"
GRANT_MINOR = 300
TIMEOUT_S = 5.0


@dataclass
class Node:
    """One Extra Balance node as the IN sees it: what reached it, on the wire."""

    origin_host: str
    diameter: DiameterNode | None = None
    port: int = 0
    # (Session-Id, CC-Request-Number, End-to-End id, T flag, Destination-Host)
    seen: list[tuple[str, int, int, bool, str | None]] = field(default_factory=list)
    hold: asyncio.Event | None = None  # set: answer; None: answer at once
    received: asyncio.Event = field(default_factory=asyncio.Event)


async def start_node(node: Node) -> None:
    async def handler(msg: codec.Message, peer: str) -> codec.Message:
        ccr = gy.parse_ccr(msg)
        node.seen.append((ccr.session_id, ccr.request_number, msg.end_to_end_id,
                          msg.is_retransmit, ccr.destination_host))
        node.received.set()
        if node.hold is not None:
            await node.hold.wait()
        return gy.build_cca(msg, node.origin_host, REALM, 2001, GRANT_MINOR,
                            currency_numeric=818, currency_exponent=2)

    node.diameter = DiameterNode(
        LocalIdentity(node.origin_host, REALM), allowed_peers=None, request_handler=handler,
        watchdog_s=5.0, request_timeout_ms=2000,
    )
    node.port = await node.diameter.listen("127.0.0.1", 0)


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[InSimulator, Node, Node]]:
    first, second = Node("eb1.test"), Node("eb2.test")
    await start_node(first)
    await start_node(second)
    sim = InSimulator(
        [InNodeSpec("in-a", "in-a.test", REALM, ranges=(MsisdnRange.parse("2010*"),))],
        [NodePeer("127.0.0.1", n.port, n.origin_host, REALM) for n in (first, second)],
        seed=3, request_timeout_ms=2000,
    )
    await sim.start()
    try:
        await sim.wait_connected(TIMEOUT_S, every_node=True)
        yield sim, first, second
    finally:
        await sim.close()
        for n in (first, second):
            assert n.diameter is not None
            await n.diameter.close()


async def test_out_of_balance_ccrs_are_spread_over_the_nodes_realm_routed(
    cluster: tuple[InSimulator, Node, Node],
) -> None:
    sim, first, second = cluster
    for _ in range(6):
        result, granted = await sim.send_out_of_balance(SUB)
        assert (result, granted) == (2001, GRANT_MINOR)
    assert len(first.seen) == len(second.seen) == 3
    # Any node of the realm may take a CCR: none names a Destination-Host.
    assert {row[4] for row in first.seen + second.seen} == {None}
    assert sim.balance(SUB) == 6 * GRANT_MINOR
    stats = sim.stats["in-a"]
    assert stats["oob_answered_by eb1.test"] == stats["oob_answered_by eb2.test"] == 3


async def test_a_node_lost_with_a_ccr_pending_the_ccr_goes_to_the_other_with_the_t_flag(
    cluster: tuple[InSimulator, Node, Node],
) -> None:
    sim, first, second = cluster
    # Both nodes hold their answer, so whichever gets the CCR first keeps it pending.
    first.hold, second.hold = asyncio.Event(), asyncio.Event()
    pending = asyncio.create_task(sim.send_out_of_balance(SUB))
    done, _ = await asyncio.wait(
        [asyncio.create_task(first.received.wait()), asyncio.create_task(second.received.wait())],
        timeout=TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    assert done, "the CCR reached no node"
    lost, survivor = (first, second) if first.seen else (second, first)
    survivor.hold.set()  # type: ignore[union-attr]
    # The node that has the CCR crashes: its connections go without a DPR.
    assert lost.diameter is not None
    assert await _drop_connections(lost.diameter) >= 1
    result, granted = await asyncio.wait_for(pending, TIMEOUT_S)
    assert (result, granted) == (2001, GRANT_MINOR)
    [(sid, number, e2e, t_flag, _dest)] = lost.seen
    assert not t_flag
    # The copy the survivor got: same Session-Id, CC-Request-Number and End-to-End id,
    # the T flag set (it may have been received).
    assert survivor.seen == [(sid, number, e2e, True, None)]
    assert sim.balance(SUB) == GRANT_MINOR  # credited once
    assert sim.nonstandard()["nonstandard_end_to_end_changed"] == 0


def test_node_peers_must_share_a_realm_and_have_their_own_origin_host() -> None:
    spec = InNodeSpec("in-a", "in-a.test", REALM, ranges=(MsisdnRange.parse("2010*"),))
    with pytest.raises(ValueError, match="one realm"):
        InSimulator([spec], [NodePeer("127.0.0.1", 1, "eb1.test", "a"),
                             NodePeer("127.0.0.1", 2, "eb2.test", "b")])
    with pytest.raises(ValueError, match="own Origin-Host"):
        InSimulator([spec], [NodePeer("127.0.0.1", 1, "eb1.test", REALM),
                             NodePeer("127.0.0.1", 2, "EB1.test", REALM)])
    one = InSimulator([spec], NodePeer("127.0.0.1", 1, "eb1.test", REALM))
    assert one.node_peers == (one.node_peer,)
    assert parse_node_peer_arg("127.0.0.1:3869:eb2.x:x") == NodePeer("127.0.0.1", 3869, "eb2.x", "x")
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_node_peer_arg("127.0.0.1:eb2.x:x")


async def test_a_key_sent_again_by_another_node_is_a_duplicate_not_a_changed_id() -> None:
    """A node that took over an operation a stopped node left sends its key with its
    own Origin-Host and End-to-End id: the first answer is replayed, nothing applied
    twice, and nothing counted as non-standard; the same node changing the id is."""
    sim = InSimulator(
        [InNodeSpec("in-a", "in-a.test", REALM, ranges=(MsisdnRange.parse("2010*"),))],
        seed=5)
    ports = await sim.start()
    clients: list[DiameterNode] = []
    try:
        for host in ("eb1.test", "eb2.test"):
            client = DiameterNode(
                LocalIdentity(host, REALM), allowed_peers=None,
                request_handler=_no_requests, watchdog_s=5.0, request_timeout_ms=2000)
            client.add_peer_group("in", REALM, [PeerAddress("127.0.0.1", ports["in-a"])])
            await client.wait_ready("in", TIMEOUT_S)
            clients.append(client)

        def refund(host: str, e2e: int, *, retransmit: bool = False) -> codec.Message:
            return gy.build_ccr(gy.CreditControlRequest(
                session_id="eb2.test;1;1;7-0000abcd", origin_host=host, origin_realm=REALM,
                destination_realm=REALM, destination_host="in-a.test", request_number=0,
                msisdn=SUB, requested_action=gy.REFUND_ACCOUNT, requested_minor=500,
                currency_numeric=818), end_to_end_id=e2e, retransmit=retransmit)

        second, first = clients[1], clients[0]
        answers = [
            gy.parse_cca(await second.request("in", refund("eb2.test", 0xABCD))),
            # eb1 takes the operation over: its own id, the T flag.
            gy.parse_cca(await first.request("in", refund("eb1.test", 0x1234, retransmit=True))),
        ]
        assert [a.result_code for a in answers] == [2001, 2001]
        assert sim.balance(SUB) == 500
        assert sim.stats["in-a"]["requests_from_another_node"] == 1
        assert sim.nonstandard()["nonstandard_end_to_end_changed"] == 0
        # The same node re-sending under another id is still counted.
        await second.request("in", refund("eb2.test", 0xBEEF, retransmit=True))
        assert sim.nonstandard()["nonstandard_end_to_end_changed"] == 1
        assert sim.balance(SUB) == 500
    finally:
        for client in clients:
            await client.close()
        await sim.close()


async def _no_requests(msg: codec.Message, peer: str) -> codec.Message:
    raise AssertionError("the IN sends these clients nothing")


async def test_nodes_that_dial_the_in_are_used_for_its_ccrs_with_the_election() -> None:
    """RFC 6733 §5.6.4 with each node (`election=True`): a node that dialled the IN is
    that node's one connection, and the IN's CCRs go over it; the IN need not reach the
    nodes' own ports (here nothing listens there)."""
    nodes = [Node("eb1.test"), Node("eb2.test")]
    sim = InSimulator(
        [InNodeSpec("in-a", "in-a.test", REALM, ranges=(MsisdnRange.parse("2010*"),))],
        [NodePeer("127.0.0.1", _closed_port(), n.origin_host, REALM) for n in nodes],
        seed=9, election=True,
    )
    ports = await sim.start()
    try:
        for node in nodes:
            await start_node(node)
            assert node.diameter is not None
            node.diameter.add_peer_group("in", REALM, [
                PeerAddress("127.0.0.1", ports["in-a"], "in-a.test")])
            await node.diameter.wait_ready("in", TIMEOUT_S)
        await sim.wait_connected(TIMEOUT_S, every_node=True)
        for _ in range(4):
            assert await sim.send_out_of_balance(SUB) == (2001, GRANT_MINOR)
        assert len(nodes[0].seen) == len(nodes[1].seen) == 2
        assert sim.balance(SUB) == 4 * GRANT_MINOR
    finally:
        await sim.close()
        for node in nodes:
            if node.diameter is not None:
                await node.diameter.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
