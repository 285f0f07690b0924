"""Peer state machine, sans-IO: two PeerConnections wired back to back, time as input."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from extrabalance.diameter import codec, gy
from extrabalance.diameter.codec import decode, encode
from extrabalance.diameter.peer import (
    TRANSITIONS,
    AnswerReceived,
    DuplicateCache,
    EndToEndIds,
    Ev,
    LocalIdentity,
    MessageRejected,
    NotOpen,
    PeerClosed,
    PeerConnection,
    PeerOpened,
    PeerRecovered,
    PeerState,
    PeerSuspect,
    PendingTableFull,
    RequestReceived,
    RequestsFailedOver,
    RequestTimedOut,
    Role,
)

from .helpers import sample_ccr

NODE = LocalIdentity("eb.node.example", "node.example", origin_state_id=7)
IN_A = LocalIdentity("in-a.operator.example", "operator.example", origin_state_id=3)


def make_pair(
    client_id: LocalIdentity = NODE,
    server_allowed: set[str] | None = None,
    **kw: object,
) -> tuple[PeerConnection, PeerConnection]:
    rng = random.Random(1)
    client = PeerConnection(client_id, Role.INITIATOR, allowed_peers={IN_A.origin_host},
                            expected_origin_host=IN_A.origin_host, rng=rng, **kw)  # type: ignore[arg-type]
    server = PeerConnection(IN_A, Role.RESPONDER,
                            allowed_peers={NODE.origin_host} if server_allowed is None
                            else server_allowed, rng=rng, **kw)  # type: ignore[arg-type]
    client.start(0.0)
    client.connection_made(0.0)
    server.connection_made(0.0)
    return client, server


def pump(a: PeerConnection, b: PeerConnection, now: float = 0.0) -> None:
    """Move bytes both ways until both are quiet."""
    for _ in range(20):
        ab, ba = a.data_to_send(), b.data_to_send()
        if not ab and not ba:
            return
        if ab:
            b.data_received(ab, now)
        if ba:
            a.data_received(ba, now)


def open_pair(**kw: object) -> tuple[PeerConnection, PeerConnection]:
    client, server = make_pair(**kw)  # type: ignore[arg-type]
    pump(client, server)
    assert client.state is PeerState.OPEN and server.state is PeerState.OPEN
    client.events(), server.events()
    return client, server


def test_every_state_survives_losing_the_transport() -> None:
    for state in PeerState:
        assert (state, Ev.PEER_DISCONNECTED) in TRANSITIONS


def test_cer_cea_happy_path() -> None:
    client, server = make_pair()
    cer = decode(client.data_to_send())
    assert cer.command_code == 257 and cer.is_request and not cer.is_proxiable
    codec.validate(cer)
    assert cer.get(258) == 4 and cer.get(266) == 0 and cer.get(269) == "ExtraBalance"
    assert str(cer.get(257)) == "127.0.0.1" and cer.get(278) == 7
    server.data_received(encode(cer), 0.0)
    cea = decode(server.data_to_send())
    assert cea.get(268) == 2001 and not cea.is_error
    codec.validate(cea)
    client.data_received(encode(cea), 0.0)
    assert client.state is PeerState.OPEN and server.state is PeerState.OPEN
    opened = [e for e in client.events() if isinstance(e, PeerOpened)]
    assert opened == [PeerOpened(IN_A.origin_host, IN_A.origin_realm, frozenset({4}),
                                 "ExtraBalance")]
    assert any(isinstance(e, PeerOpened) for e in server.events())


def test_unknown_peer_gets_3010_with_e_bit_and_is_disconnected() -> None:
    client, server = make_pair(server_allowed={"someone.else"})
    server.data_received(client.data_to_send(), 0.0)
    cea = decode(server.data_to_send())
    assert cea.get(268) == 3010 and cea.is_error
    assert server.state is PeerState.CLOSED
    assert any(isinstance(e, PeerClosed) for e in server.events())
    client.data_received(encode(cea), 0.0)
    assert client.state is PeerState.CLOSED and "3010" in (client.close_reason or "")


def test_no_common_application_gets_5010() -> None:
    client, server = make_pair(
        client_id=LocalIdentity("eb.node.example", "node.example", auth_application_ids=(16777238,)))
    server.data_received(client.data_to_send(), 0.0)
    cea = decode(server.data_to_send())
    assert cea.get(268) == 5010 and not cea.is_error
    assert server.state is PeerState.CLOSED


def test_relay_application_counts_as_common() -> None:
    client, server = make_pair(
        client_id=LocalIdentity("eb.node.example", "node.example",
                                auth_application_ids=(0xFFFFFFFF,)))
    server.data_received(client.data_to_send(), 0.0)
    assert decode(server.data_to_send()).get(268) == 2001


def test_cea_from_unexpected_host_closes() -> None:
    client = PeerConnection(NODE, Role.INITIATOR, allowed_peers=None,
                            expected_origin_host="in-b.operator.example")
    server = PeerConnection(IN_A, Role.RESPONDER, allowed_peers=None)
    client.start(0.0)
    client.connection_made(0.0)
    pump(client, server)
    assert client.state is PeerState.CLOSED
    assert "expected" in (client.close_reason or "")


def test_traffic_before_cer_closes_the_connection() -> None:
    _, server = make_pair()
    server.data_received(encode(sample_ccr()), 0.0)
    assert server.state is PeerState.CLOSED
    assert any(isinstance(e, PeerClosed) for e in server.events())


def test_request_answer_and_ids() -> None:
    client, server = open_pair()
    sent = client.send_request(sample_ccr(), "token-1", 1.0, 2.0)
    pump(client, server, 1.0)
    [received] = [e for e in server.events() if isinstance(e, RequestReceived)]
    assert received.message == sent and sent.hop_by_hop_id != 0
    answer = gy.build_cca(received.message, IN_A.origin_host, IN_A.origin_realm, 2001,
                          currency_numeric=818, currency_exponent=2)
    server.send_answer(answer)
    pump(client, server, 1.1)
    [got] = [e for e in client.events() if isinstance(e, AnswerReceived)]
    assert got.token == "token-1" and got.message.get(268) == 2001
    assert client.pending_count == 0
    # a duplicate answer is discarded, not delivered twice
    client.data_received(encode(answer), 1.2)
    assert not [e for e in client.events() if isinstance(e, AnswerReceived)]


def test_request_deadline_gives_timeout_and_late_answer_is_dropped() -> None:
    client, server = open_pair()
    client.send_request(sample_ccr(), "t", 0.0, 2.0)
    pump(client, server)
    [req] = [e for e in server.events() if isinstance(e, RequestReceived)]
    assert client.next_timer() is not None
    client.handle_timer(1.9)
    assert not [e for e in client.events() if isinstance(e, RequestTimedOut)]
    client.handle_timer(2.0)
    [timed_out] = [e for e in client.events() if isinstance(e, RequestTimedOut)]
    assert timed_out.token == "t"
    server.send_answer(gy.build_cca(req.message, "in", "r", 2001, currency_numeric=818,
                                    currency_exponent=2))
    pump(client, server, 2.5)
    assert not [e for e in client.events() if isinstance(e, AnswerReceived)]


def test_pending_table_is_bounded() -> None:
    client, _server = open_pair(pending_max=3)
    for i in range(3):
        client.send_request(sample_ccr(), i, 0.0, 5.0)
    try:
        client.send_request(sample_ccr(), 4, 0.0, 5.0)
    except PendingTableFull:
        pass
    else:
        raise AssertionError("fourth request accepted")


def test_send_before_open_is_refused() -> None:
    client, _ = make_pair()
    try:
        client.send_request(sample_ccr(), 1, 0.0, 1.0)
    except NotOpen:
        return
    raise AssertionError("sent before CEA")


def test_dwr_dwa_keep_the_peer_open() -> None:
    client, server = open_pair(watchdog_s=30.0)
    now = 0.0
    for _ in range(5):
        now = client.next_timer() or now
        client.handle_timer(now)
        dwr = client.data_to_send()
        assert decode(dwr).command_code == 280 and decode(dwr).is_request
        server.data_received(dwr, now)
        dwa = server.data_to_send()
        assert decode(dwa).get(268) == 2001
        client.data_received(dwa, now)
        assert client.state is PeerState.OPEN
    assert 5 * 28 <= now <= 5 * 32  # Tw 30 s, jittered ±2 s


def test_watchdog_suspect_fails_over_then_down() -> None:
    client, _server = open_pair(watchdog_s=30.0)
    client.send_request(sample_ccr(), "pending", 0.0, 1000.0)
    client.data_to_send()  # the server never hears anything again
    t1 = client.next_timer()
    assert t1 is not None
    client.handle_timer(t1)  # Tw: send DWR
    assert decode(client.data_to_send()).command_code == 280
    t2 = client.next_timer()
    assert t2 is not None
    client.handle_timer(t2)  # second Tw, DWR unanswered: suspect, fail over
    events = client.events()
    assert client.state is PeerState.SUSPECT
    assert any(isinstance(e, PeerSuspect) for e in events)
    [failed] = [e for e in events if isinstance(e, RequestsFailedOver)]
    assert [token for token, _ in failed.requests] == ["pending"]
    t3 = client.next_timer()
    assert t3 is not None
    client.handle_timer(t3)  # third: down
    assert client.state is PeerState.CLOSED
    assert any(isinstance(e, PeerClosed) for e in client.events())


def test_suspect_peer_recovers_on_any_message() -> None:
    client, server = open_pair(watchdog_s=30.0)
    for _ in range(2):
        t = client.next_timer()
        assert t is not None
        client.handle_timer(t)
    assert client.state is PeerState.SUSPECT
    dwr = client.data_to_send()
    server.data_received(dwr, 70.0)
    client.data_received(server.data_to_send(), 70.0)
    assert client.state is PeerState.OPEN
    assert any(isinstance(e, PeerRecovered) for e in client.events())


def test_dpr_dpa_on_close() -> None:
    client, server = open_pair()
    client.send_request(sample_ccr(), "in-flight", 0.0, 10.0)
    client.close(0.0)
    assert client.state is PeerState.CLOSING
    out = client.data_to_send()
    server.data_received(out, 0.0)
    assert server.state is PeerState.CLOSING
    dpa = server.data_to_send()
    dpa_msg = codec.Framer().feed(dpa)[-1]
    assert decode(dpa_msg).command_code == 282 and decode(dpa_msg).get(268) == 2001
    client.data_received(dpa, 0.0)
    assert client.state is PeerState.CLOSED
    assert any(isinstance(e, RequestsFailedOver) for e in client.events())
    # the DPR receiver closes the transport itself if the sender does not
    t = server.next_timer()
    assert t is not None
    server.handle_timer(t)
    assert server.state is PeerState.CLOSED


def test_malformed_request_is_answered_and_connection_stays_open() -> None:
    _client, server = open_pair()
    data = bytearray(encode(sample_ccr().with_ids(5, 6)))
    pos = data.index(b"201001234567")
    data[pos] = 0xFF  # invalid UTF-8 -> 5004
    server.data_received(bytes(data), 0.0)
    answer = decode(server.data_to_send())
    assert answer.get(268) == 5004 and (answer.hop_by_hop_id, answer.end_to_end_id) == (5, 6)
    assert answer.first(279) is not None
    assert server.state is PeerState.OPEN
    assert any(isinstance(e, MessageRejected) and e.answered for e in server.events())
    # an unknown command: 3001 with the E bit
    server.data_received(encode(sample_ccr()._replace(command_code=999)), 0.0)
    answer = decode(server.data_to_send())
    assert answer.get(268) == 3001 and answer.is_error
    assert server.state is PeerState.OPEN


def test_undecodable_frame_closes_only_that_connection() -> None:
    client, server = open_pair()
    other_client, other_server = open_pair()
    client.send_request(sample_ccr(), "lost", 0.0, 5.0)
    server.data_received(b"\x07\x00\x00\x14" + bytes(16), 0.0)  # version 7
    assert server.state is PeerState.CLOSED
    client.connection_lost(0.0)
    assert any(isinstance(e, RequestsFailedOver) for e in client.events())
    assert other_client.state is PeerState.OPEN and other_server.state is PeerState.OPEN


def test_duplicate_cache_is_bounded_in_size_and_age() -> None:
    cache = DuplicateCache(max_entries=3, ttl_s=10.0)
    for i in range(5):
        cache.put("a", i, f"answer-{i}", now=float(i))
    assert len(cache) == 3
    assert cache.get("a", 0, 5.0) is None and cache.get("a", 4, 5.0) == "answer-4"
    assert cache.get("a", 4, 15.0) is None  # too old
    assert cache.get("b", 4, 5.0) is None  # other Origin-Host


def test_end_to_end_ids_are_unique_and_carry_the_clock() -> None:
    ids = EndToEndIds(0x12345, random.Random(3))
    seen = {ids.next() for _ in range(10000)}
    assert len(seen) == 10000
    assert all(i >> 20 == 0x345 for i in seen)


def test_broken_answer_is_dropped_and_its_request_times_out() -> None:
    client, server = open_pair()
    sent = client.send_request(sample_ccr(), "t", 0.0, 2.0)
    pump(client, server)
    answer = bytearray(encode(gy.build_cca(sent, "in", "r", 2001, granted_minor=5,
                                           currency_numeric=818, currency_exponent=2)))
    pos = answer.index(struct.pack(">I", 415) + b"\x40\x00\x00\x0c")  # CC-Request-Number
    answer[pos + 7] = 10  # bad length
    client.data_received(bytes(answer), 0.5)
    events = client.events()
    assert not [e for e in events if isinstance(e, AnswerReceived)]
    assert any(isinstance(e, MessageRejected) and not e.answered for e in events)
    assert client.state is PeerState.OPEN and client.pending_count == 1
    client.handle_timer(2.0)
    assert [e for e in client.events() if isinstance(e, RequestTimedOut)]


@settings(max_examples=300)
@given(st.data())
def test_any_bytes_from_a_peer_never_raise(data: st.DataObject) -> None:
    client, server = open_pair()
    frames = [encode(sample_ccr()), encode(gy.build_cca(sample_ccr(), "in", "r", 2001,
                                                        currency_numeric=818,
                                                        currency_exponent=2))]
    for _ in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()):
            chunk = bytearray(data.draw(st.sampled_from(frames)))
            for _ in range(data.draw(st.integers(0, 4))):
                chunk[data.draw(st.integers(0, len(chunk) - 1))] = data.draw(st.integers(0, 255))
        else:
            chunk = bytearray(data.draw(st.binary(max_size=64)))
        for peer in (client, server):
            peer.data_received(bytes(chunk), 1.0)
            peer.handle_timer(50.0)
            peer.data_to_send()
            peer.events()


def test_any_message_restarts_tw() -> None:
    client, server = open_pair(watchdog_s=30.0)
    # the server sends a request at t=20: the client's Tw now counts from 20
    server.send_request(sample_ccr(), "from-server", 20.0, 5.0)
    client.data_received(server.data_to_send(), 20.0)
    client.handle_timer(33.0)  # past 0 + 30 + 2, but not 20 + 28
    assert client.data_to_send() == b""
    client.handle_timer(52.5)  # past 20 + 32: idle for a whole Tw, so DWR
    assert decode(client.data_to_send()).command_code == 280
    assert client.state is PeerState.OPEN
