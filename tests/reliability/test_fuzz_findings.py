"""What the fuzzer found, pinned as sans-IO tests so it stays fixed.

Each case is a frame a connected, allowed IN peer can send that used to end its own
connection (a closed connection also drops every request pending on it) or change
who the node believed the peer was.
"""

from __future__ import annotations

import ipaddress

from extrabalance.diameter import codec
from extrabalance.diameter.codec import avp
from extrabalance.diameter.constants import (
    AVP_AUTH_APPLICATION_ID,
    AVP_HOST_IP_ADDRESS,
    AVP_ORIGIN_HOST,
    AVP_ORIGIN_REALM,
    AVP_PRODUCT_NAME,
    AVP_RESULT_CODE,
    AVP_VENDOR_ID,
)
from extrabalance.diameter.peer import LocalIdentity, PeerConnection, PeerState, Role

NODE = LocalIdentity("eb.operator.example", "operator.example")
IN_A = "in-a.operator.example"
IN_B = "in-b.operator.example"


def capabilities(origin_host: str, *, request: bool = True, result: int | None = None,
                 drop: int | None = None) -> bytes:
    avps = [avp(AVP_ORIGIN_HOST, origin_host), avp(AVP_ORIGIN_REALM, "operator.example"),
            avp(AVP_HOST_IP_ADDRESS, ipaddress.ip_address("127.0.0.1")),
            avp(AVP_VENDOR_ID, 0), avp(AVP_PRODUCT_NAME, "in"),
            avp(AVP_AUTH_APPLICATION_ID, 4)]
    if result is not None:
        avps.insert(0, avp(AVP_RESULT_CODE, result))
    avps = [a for a in avps if a.code != drop]
    msg = codec.request(257, 0, avps, proxiable=False, hop_by_hop_id=9, end_to_end_id=9)
    if not request:
        msg = msg._replace(flags=0)
    return codec.encode(msg)


def open_responder() -> PeerConnection:
    peer = PeerConnection(NODE, Role.RESPONDER, allowed_peers={IN_A, IN_B})
    peer.connection_made(0.0)
    peer.data_received(capabilities(IN_A), 0.0)
    assert peer.state is PeerState.OPEN
    peer.data_to_send()
    peer.events()
    return peer


def answers(peer: PeerConnection) -> list[codec.Message]:
    data = peer.data_to_send()
    return [codec.decode(f) for f in codec.Framer().feed(data)]


def test_invalid_cer_on_an_open_connection_is_answered_not_fatal() -> None:
    peer = open_responder()
    peer.data_received(capabilities(IN_A, drop=AVP_HOST_IP_ADDRESS), 1.0)
    assert peer.state is PeerState.OPEN
    [answer] = answers(peer)
    assert answer.get(AVP_RESULT_CODE) == 5005
    assert peer.peer_origin_host == IN_A


def test_cer_on_an_open_connection_does_not_change_the_peer() -> None:
    peer = open_responder()
    peer.data_received(capabilities(IN_B), 1.0)
    assert peer.state is PeerState.OPEN
    [answer] = answers(peer)
    assert answer.get(AVP_RESULT_CODE) == 5012
    assert peer.peer_origin_host == IN_A


def test_unknown_peer_cer_on_an_open_connection_does_not_change_the_peer() -> None:
    peer = open_responder()
    peer.data_received(capabilities("rogue.example"), 1.0)
    assert peer.peer_origin_host == IN_A


def test_stray_cea_on_an_open_connection_is_discarded() -> None:
    peer = open_responder()
    peer.data_received(capabilities("rogue.example", request=False, result=2001), 1.0)
    assert peer.state is PeerState.OPEN
    assert peer.peer_origin_host == IN_A
    assert answers(peer) == []


def test_stray_dpa_on_an_open_connection_is_discarded() -> None:
    peer = open_responder()
    dpa = codec.encode(codec.Message(282, 0, 0, 5, 5, (
        avp(AVP_RESULT_CODE, 2001), avp(AVP_ORIGIN_HOST, IN_A),
        avp(AVP_ORIGIN_REALM, "operator.example"))))
    peer.data_received(dpa, 1.0)
    assert peer.state is PeerState.OPEN
