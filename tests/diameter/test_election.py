"""RFC 6733 §5.6: one connection per peer, and the election when both sides dial.

Sans-IO tests of the per-peer table (``PeerLink``) and of the held CER on a
responder connection, then two DiameterNodes over loopback that each dial the other.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

import pytest

from extrabalance.diameter import gy
from extrabalance.diameter.aio.node import DiameterNode, LocalIdentity, PeerAddress
from extrabalance.diameter.codec import decode, encode
from extrabalance.diameter.peer import (
    LINK_TRANSITIONS,
    AcceptResponder,
    CapabilitiesReceived,
    DropConnection,
    LinkState,
    PeerConnection,
    PeerLink,
    PeerOpened,
    PeerState,
    RejectResponder,
    Role,
    origin_host_wins,
)

from .helpers import sample_ccr, sample_ccr_dataclass

HIGH = "in-a.operator.example"  # "i" > "e": wins against LOW
LOW = "eb.node.example"
MY_CONN, THEIR_CONN, OTHER_CONN = "initiator", "responder", "another responder"


def test_every_link_state_has_transitions() -> None:
    assert {state for state, _ in LINK_TRANSITIONS} == set(LinkState)


def test_origin_hosts_compare_as_octets_without_case() -> None:
    assert origin_host_wins(HIGH, LOW) and not origin_host_wins(LOW, HIGH)
    assert origin_host_wins("B.example", "a.example")  # "b" > "a" once folded
    assert not origin_host_wins("a.EXAMPLE", "A.example")
    assert not origin_host_wins("A.example", "a.EXAMPLE")  # equal: nobody wins


def dialled_and_dialling(local: str, peer: str) -> PeerLink:
    """A link that dialled (CER sent, Wait-I-CEA) when the peer's own CER arrives."""
    link = PeerLink(local, peer)
    assert link.start() and link.state is LinkState.WAIT_CONN_ACK
    link.initiator_connected(MY_CONN)
    assert link.state is LinkState.WAIT_I_CEA
    link.responder_cer(THEIR_CONN, peer, 1)
    return link


def test_winner_closes_the_connection_it_dialled_and_answers_the_peer() -> None:
    link = dialled_and_dialling(HIGH, LOW)
    assert link.state is LinkState.R_OPEN and link.conn == THEIR_CONN
    [drop, accept] = link.commands()
    assert drop == DropConnection(MY_CONN, 4003, "election won: the peer's connection is kept")
    assert accept == AcceptResponder(THEIR_CONN)
    link.initiator_closed(MY_CONN)  # the closed one reports in: already forgotten
    assert link.state is LinkState.R_OPEN and not link.commands()


def test_loser_waits_for_its_cea_then_drops_the_held_cer_with_4003() -> None:
    link = dialled_and_dialling(LOW, HIGH)
    assert link.state is LinkState.WAIT_RETURNS and not link.commands()
    assert link.conn is None  # nothing carries traffic during the election
    link.initiator_opened(MY_CONN, 1)
    assert link.state is LinkState.I_OPEN and link.conn == MY_CONN
    assert link.commands() == [DropConnection(THEIR_CONN, 4003, "election lost")]


def test_loser_takes_the_peers_connection_if_its_own_fails() -> None:
    link = dialled_and_dialling(LOW, HIGH)
    link.initiator_closed(MY_CONN)
    assert link.state is LinkState.R_OPEN
    assert link.commands() == [AcceptResponder(THEIR_CONN)]


def test_loser_whose_held_peer_leaves_keeps_waiting_for_its_cea() -> None:
    link = dialled_and_dialling(LOW, HIGH)
    link.responder_closed(THEIR_CONN)
    assert link.state is LinkState.WAIT_I_CEA
    link.initiator_opened(MY_CONN, 1)
    assert link.state is LinkState.I_OPEN and not link.commands()


def test_cer_while_still_connecting_elects_when_the_transport_is_up() -> None:
    link = PeerLink(HIGH, LOW)
    link.start()
    link.responder_cer(THEIR_CONN, LOW, 1)
    assert link.state is LinkState.WAIT_CONN_ACK_ELECT and not link.commands()
    link.initiator_connected(MY_CONN)
    assert link.state is LinkState.R_OPEN
    assert link.commands() == [DropConnection(MY_CONN, 4003, "election won: the peer's connection is kept"),
                               AcceptResponder(THEIR_CONN)]


def test_cer_while_connecting_and_our_dial_fails_takes_the_peers_connection() -> None:
    link = PeerLink(LOW, HIGH)
    link.start()
    link.responder_cer(THEIR_CONN, HIGH, 1)
    link.initiator_failed()
    assert link.state is LinkState.R_OPEN and link.commands() == [AcceptResponder(THEIR_CONN)]


def test_idle_link_accepts_the_peers_connection_and_refuses_a_second() -> None:
    link = PeerLink(LOW, HIGH)
    link.responder_cer(THEIR_CONN, HIGH, 5)
    assert link.state is LinkState.R_OPEN and link.commands() == [AcceptResponder(THEIR_CONN)]
    assert not link.start()  # served: the adapter does not dial
    link.responder_cer(OTHER_CONN, HIGH, 5)
    [refusal] = link.commands()
    assert isinstance(refusal, RejectResponder) and refusal.conn == OTHER_CONN
    assert refusal.result_code == 5012 and link.conn == THEIR_CONN
    link.responder_closed(THEIR_CONN)
    assert link.state is LinkState.CLOSED and link.start()


def test_a_restarted_peer_replaces_the_dead_connection() -> None:
    link = PeerLink(LOW, HIGH)
    link.start()
    link.initiator_connected(MY_CONN)
    link.initiator_opened(MY_CONN, 5)
    assert link.state is LinkState.I_OPEN
    link.responder_cer(OTHER_CONN, HIGH, 5)  # same Origin-State-Id: refused
    assert [type(c) for c in link.commands()] == [RejectResponder]
    link.responder_cer(THEIR_CONN, HIGH, 6)  # new Origin-State-Id: it restarted
    assert link.state is LinkState.R_OPEN and link.conn == THEIR_CONN
    commands = link.commands()
    assert [type(c) for c in commands] == [DropConnection, AcceptResponder]
    assert commands[0].conn == MY_CONN and link.open_origin_state_id == 6


def test_reports_about_foreign_connections_change_nothing() -> None:
    link = dialled_and_dialling(LOW, HIGH)
    link.initiator_opened(OTHER_CONN, 1)
    link.initiator_closed(OTHER_CONN)
    link.responder_closed(OTHER_CONN)
    assert link.state is LinkState.WAIT_RETURNS and not link.commands()


# --- the held CER on a responder connection -----------------------------------------------

NODE = LocalIdentity(LOW, "node.example", origin_state_id=7)
IN_A = LocalIdentity(HIGH, "operator.example", origin_state_id=3)


def _cer_on_held_responder() -> tuple[PeerConnection, PeerConnection]:
    rng = random.Random(1)
    client = PeerConnection(NODE, Role.INITIATOR, expected_origin_host=HIGH, rng=rng)
    server = PeerConnection(IN_A, Role.RESPONDER, allowed_peers={LOW}, rng=rng, hold_cer=True)
    client.start(0.0)
    client.connection_made(0.0)
    server.connection_made(0.0)
    server.data_received(client.data_to_send(), 0.0)
    assert server.state is PeerState.WAIT_ACCEPT and server.data_to_send() == b""
    assert server.events() == [CapabilitiesReceived(LOW, "node.example", 7)]
    return client, server


def test_held_cer_is_answered_on_accept_and_what_followed_it_after() -> None:
    client, server = _cer_on_held_responder()
    ccr = gy.build_ccr(sample_ccr_dataclass(), hop_by_hop_id=1, end_to_end_id=2)
    server.data_received(encode(ccr), 0.0)  # too early, but kept in order
    assert server.data_to_send() == b""
    server.accept(0.0)
    assert server.state is PeerState.OPEN
    client.data_received(server.data_to_send(), 0.0)
    assert client.state is PeerState.OPEN
    events = server.events()
    assert isinstance(events[0], PeerOpened)
    assert [type(e).__name__ for e in events[1:]] == ["RequestReceived"]


def test_held_cer_refused_gets_4003_without_the_e_bit_and_closes() -> None:
    client, server = _cer_on_held_responder()
    server.reject(0.0, 4003, "election lost")
    cea = decode(server.data_to_send())
    assert cea.command_code == 257 and cea.get(268) == 4003 and not cea.is_error
    assert server.state is PeerState.CLOSED
    client.data_received(encode(cea), 0.0)
    assert client.state is PeerState.CLOSED and "4003" in (client.close_reason or "")


def test_held_cer_times_out_like_a_missing_one() -> None:
    _, server = _cer_on_held_responder()
    server.handle_timer(server.next_timer() or 0.0)
    assert server.state is PeerState.CLOSED


def test_a_flood_behind_a_held_cer_is_bounded() -> None:
    _, server = _cer_on_held_responder()
    frame = encode(sample_ccr())
    server.data_received(frame * 70, 0.0)
    assert server.state is PeerState.CLOSED


# --- two nodes that dial each other --------------------------------------------------------


@pytest.fixture
async def pair() -> AsyncIterator[Callable[[], tuple[DiameterNode, DiameterNode]]]:
    made: list[DiameterNode] = []

    def make() -> tuple[DiameterNode, DiameterNode]:
        high = _answering_node(IN_A)
        low = _answering_node(NODE)
        made.extend([high, low])
        return high, low

    yield make
    for node in made:
        await node.close()


def _answering_node(identity: LocalIdentity) -> DiameterNode:
    peer = LOW if identity.origin_host == HIGH else HIGH

    async def handler(msg: object, origin: str) -> object:
        ccr = gy.parse_ccr(msg)  # type: ignore[arg-type]
        return gy.build_cca(msg, identity.origin_host, identity.origin_realm,  # type: ignore[arg-type]
                            2001, granted_minor=1, currency_numeric=818, currency_exponent=2,
                            event_timestamp=ccr.event_timestamp)

    return DiameterNode(identity, allowed_peers={peer}, request_handler=handler,  # type: ignore[arg-type]
                        reconnect_min_s=0.05, reconnect_max_s=0.2, election=True)


def _open_connections(node: DiameterNode) -> int:
    return sum(1 for c in node._connections if c.peer.is_open)


async def _settled(high: DiameterNode, low: DiameterNode) -> None:
    """Until each side has exactly one connection, open, and nothing else."""
    async with asyncio.timeout(10):
        while not (len(high._connections) == len(low._connections) == 1
                   and _open_connections(high) == _open_connections(low) == 1):
            await asyncio.sleep(0.01)


async def _both_ways(high: DiameterNode, low: DiameterNode) -> None:
    to_high = gy.parse_cca(await low.request("peer", sample_ccr()))
    assert to_high.result_code == 2001 and to_high.origin_host == HIGH
    to_low = gy.parse_cca(await high.request("peer", sample_ccr()))
    assert to_low.result_code == 2001 and to_low.origin_host == LOW


def _direction(node: DiameterNode) -> str:
    [row] = [r for r in node.peer_states() if r["group"] == "peer"]
    assert row["state"] == "Open"
    return str(row["direction"])


@pytest.mark.parametrize("round_", range(3))
async def test_simultaneous_dial_keeps_one_connection_and_requests_flow_both_ways(
        pair: Callable[[], tuple[DiameterNode, DiameterNode]], round_: int) -> None:
    high, low = pair()
    high_port = await high.listen("127.0.0.1", 0)
    low_port = await low.listen("127.0.0.1", 0)
    # Both start dialling in the same loop turn: the CERs cross.
    high.add_peer_group("peer", "node.example", [PeerAddress("127.0.0.1", low_port, LOW)])
    low.add_peer_group("peer", "operator.example", [PeerAddress("127.0.0.1", high_port, HIGH)])
    await asyncio.gather(high.wait_ready("peer", 5), low.wait_ready("peer", 5))
    await _settled(high, low)
    # The higher Origin-Host kept the connection the lower one dialled.
    assert _direction(high) == "in" and _direction(low) == "out"
    await _both_ways(high, low)
    assert len(high._connections) == len(low._connections) == 1


async def test_after_the_connection_drops_both_redial_and_settle_again(
        pair: Callable[[], tuple[DiameterNode, DiameterNode]]) -> None:
    high, low = pair()
    high_port = await high.listen("127.0.0.1", 0)
    low_port = await low.listen("127.0.0.1", 0)
    high.add_peer_group("peer", "node.example", [PeerAddress("127.0.0.1", low_port, LOW)])
    low.add_peer_group("peer", "operator.example", [PeerAddress("127.0.0.1", high_port, HIGH)])
    await _settled(high, low)
    for _ in range(2):
        [conn] = list(low._connections)
        assert conn.transport is not None
        conn.transport.abort()  # a cut cable: both sides notice and both redial
        async with asyncio.timeout(5):
            while conn in low._connections:
                await asyncio.sleep(0.01)
        await _settled(high, low)
        await _both_ways(high, low)


async def test_peer_dialling_a_node_that_does_not_dial_is_accepted_as_before(
        pair: Callable[[], tuple[DiameterNode, DiameterNode]]) -> None:
    high, low = pair()
    high_port = await high.listen("127.0.0.1", 0)
    await low.listen("127.0.0.1", 0)
    low.add_peer_group("peer", "operator.example", [PeerAddress("127.0.0.1", high_port, HIGH)])
    await low.wait_ready("peer", 5)
    await _settled(high, low)
    reply = gy.parse_cca(await low.request("peer", sample_ccr()))
    assert reply.result_code == 2001
    [row] = [r for r in high.peer_states() if r["direction"] == "in"]
    assert row["origin_host"] == LOW and row["state"] == "Open" and row["group"] is None


async def test_without_election_each_dialled_connection_stands_alone() -> None:
    high = _answering_node(IN_A)
    low = _answering_node(NODE)
    high.election = low.election = False
    try:
        high_port = await high.listen("127.0.0.1", 0)
        low_port = await low.listen("127.0.0.1", 0)
        high.add_peer_group("peer", "node.example", [PeerAddress("127.0.0.1", low_port, LOW)])
        low.add_peer_group("peer", "operator.example",
                           [PeerAddress("127.0.0.1", high_port, HIGH)])
        async with asyncio.timeout(10):
            while not _open_connections(high) == _open_connections(low) == 2:
                await asyncio.sleep(0.01)
        await _both_ways(high, low)
        assert _direction(high) == _direction(low) == "out"
    finally:
        await high.close()
        await low.close()
