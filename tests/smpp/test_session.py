"""Session state machine tests, sans-IO: two Session objects wired by hand."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extrabalance.smpp.pdu import (
    CommandId,
    DeliverSm,
    DeliverSmResp,
    EnquireLink,
    GenericNack,
    Pdu,
    Status,
    SubmitSm,
    SubmitSmResp,
    decode,
    encode,
    make_response,
)
from extrabalance.smpp.session import (
    LATE_RESPONSE_WAIT_FACTOR,
    TRANSITIONS,
    BindRefused,
    Bound,
    LateResponse,
    LinkDead,
    ProtocolViolation,
    QueueFull,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
    Role,
    Session,
    SessionStateError,
    State,
    Unbound,
)

CREDENTIALS = {"node": "secret"}


def auth(pdu: Pdu) -> int:
    system_id = getattr(pdu, "system_id", "")
    if system_id not in CREDENTIALS:
        return Status.ESME_RINVSYSID
    if CREDENTIALS[system_id] != getattr(pdu, "password", ""):
        return Status.ESME_RINVPASWD
    return Status.ESME_ROK


def pair(**kw: object) -> tuple[Session, Session]:
    esme = Session(Role.ESME, **kw)  # type: ignore[arg-type]
    smsc = Session(Role.SMSC, system_id="SMSC", authenticator=auth, **kw)  # type: ignore[arg-type]
    return esme, smsc


def pump(a: Session, b: Session, now_s: float = 0.0) -> tuple[list[object], list[object]]:
    """Move bytes both ways until quiet; events seen by a and by b."""
    ev_a: list[object] = []
    ev_b: list[object] = []
    for _ in range(20):
        da, db = a.data_to_send(), b.data_to_send()
        if not da and not db:
            break
        if da:
            ev_b += b.receive_data(da, now_s)
        if db:
            ev_a += a.receive_data(db, now_s)
    return ev_a, ev_b


def bound_pair(**kw: object) -> tuple[Session, Session]:
    esme, smsc = pair(**kw)
    esme.bind("trx", "node", "secret", now_s=0.0)
    ev_e, ev_s = pump(esme, smsc)
    assert ev_e == [Bound("trx", "SMSC")] and ev_s == [Bound("trx", "node")]
    assert esme.state is smsc.state is State.BOUND_TRX
    return esme, smsc


def test_table_is_readable_and_closed_is_terminal() -> None:
    assert not any(s is State.CLOSED for (s, _e) in TRANSITIONS)


def test_bind_and_submit_and_deliver() -> None:
    esme, smsc = bound_pair()
    seq = esme.send_request(SubmitSm(source_addr="123", destination_addr="2010"), 0.0)
    _, ev_s = pump(esme, smsc)
    (req,) = ev_s
    assert isinstance(req, RequestReceived) and req.pdu.sequence_number == seq
    smsc.send_response(make_response(req.pdu, 0, message_id="m1"))
    ev_e, _ = pump(esme, smsc)
    (resp,) = ev_e
    assert isinstance(resp, ResponseReceived) and resp.response.message_id == "m1"  # type: ignore[union-attr]
    assert resp.request.sequence_number == seq
    smsc.send_request(DeliverSm(source_addr="2010", destination_addr="123"), 0.0)
    ev_e, _ = pump(esme, smsc)
    assert isinstance(ev_e[0], RequestReceived) and isinstance(ev_e[0].pdu, DeliverSm)


@pytest.mark.parametrize(("password", "status"), [("wrong", Status.ESME_RINVPASWD)])
def test_bind_refused(password: str, status: int) -> None:
    esme, smsc = pair()
    esme.bind("trx", "node", password, now_s=0.0)
    ev_e, ev_s = pump(esme, smsc)
    assert ev_e == [BindRefused(status)] and ev_s == []
    assert esme.state is State.OPEN and smsc.state is State.OPEN
    esme.bind("trx", "ghost", "x", now_s=0.0)
    ev_e, _ = pump(esme, smsc)
    assert ev_e == [BindRefused(Status.ESME_RINVSYSID)]


def test_requests_before_bind_get_invbndsts_and_local_send_is_refused() -> None:
    esme, smsc = pair()
    with pytest.raises(SessionStateError):
        esme.send_request(SubmitSm(), 0.0)
    raw = encode(SubmitSm(sequence_number=5))
    smsc.receive_data(raw, 0.0)
    resp = decode(smsc.data_to_send())
    assert isinstance(resp, SubmitSmResp) and resp.command_status == Status.ESME_RINVBNDSTS
    assert resp.sequence_number == 5


def test_receiver_bind_may_not_submit() -> None:
    esme, smsc = pair()
    esme.bind("rx", "node", "secret", now_s=0.0)
    pump(esme, smsc)
    assert smsc.state is State.BOUND_RX
    with pytest.raises(SessionStateError):
        esme.send_request(SubmitSm(), 0.0)
    smsc.receive_data(encode(SubmitSm(sequence_number=9)), 0.0)
    assert decode(smsc.data_to_send()).command_status == Status.ESME_RINVBNDSTS
    assert smsc.state is State.BOUND_RX


def test_second_bind_gets_already_bound() -> None:
    _esme, smsc = bound_pair()
    smsc.receive_data(encode(esme_bind_pdu()), 0.0)
    assert decode(smsc.data_to_send()).command_status == Status.ESME_RALYBND


def esme_bind_pdu() -> Pdu:
    from extrabalance.smpp.pdu import BindTransceiver

    return BindTransceiver(system_id="node", password="secret", sequence_number=77)


def test_window_queue_and_queue_full() -> None:
    esme, smsc = bound_pair(window_max=2, queue_max=3)
    seqs = [esme.send_request(SubmitSm(), 0.0) for _ in range(5)]
    with pytest.raises(QueueFull):
        esme.send_request(SubmitSm(), 0.0)
    assert esme.window_used == 2 and esme.queued == 3
    wire = esme.data_to_send()
    got = smsc.receive_data(wire, 0.0)
    assert [e.pdu.sequence_number for e in got] == seqs[:2]  # type: ignore[attr-defined]
    smsc.send_response(make_response(got[0].pdu, 0, message_id="a"))  # type: ignore[attr-defined]
    ev_e, ev_s = pump(esme, smsc)
    assert len(ev_e) == 1 and [e.pdu.sequence_number for e in ev_s] == [seqs[2]]  # type: ignore[attr-defined]
    assert esme.window_used == 2 and esme.queued == 2


def test_response_timeout_keeps_the_window_slot_until_the_late_response() -> None:
    """A slow SMSC answers after our timeout: the caller is told at the timeout, but
    the request still counts against the window until its response comes, so the
    SMSC never has more than window_max requests unanswered."""
    esme, smsc = bound_pair(window_max=1, response_timeout_s=5.0)
    first = esme.send_request(SubmitSm(), 0.0)
    esme.send_request(SubmitSm(), 0.0)
    assert esme.queued == 1
    assert esme.tick(4.9) == []
    events = esme.tick(5.0)
    assert [type(e) for e in events] == [RequestFailed]
    assert events[0].reason == "timeout"  # type: ignore[union-attr]
    assert esme.window_used == 1 and esme.queued == 1  # the slot is still taken
    got = smsc.receive_data(esme.data_to_send(), 5.0)
    assert [e.pdu.sequence_number for e in got] == [first]  # type: ignore[attr-defined]
    smsc.send_response(make_response(got[0].pdu, 0, message_id="late"))  # type: ignore[attr-defined]
    late = esme.receive_data(smsc.data_to_send(), 6.0)
    assert [type(e) for e in late] == [LateResponse]
    assert esme.window_used == 1 and esme.queued == 0  # the queued one went out now


def test_a_request_never_answered_resets_the_connection() -> None:
    esme, _smsc = bound_pair(window_max=2, response_timeout_s=5.0)
    esme.send_request(SubmitSm(), 0.0)
    assert [type(e) for e in esme.tick(5.0)] == [RequestFailed]
    assert esme.tick(5.0 + 5.0 * LATE_RESPONSE_WAIT_FACTOR - 0.1) == []
    events = esme.tick(5.0 + 5.0 * LATE_RESPONSE_WAIT_FACTOR)
    assert isinstance(events[0], LinkDead) and "unanswered" in events[0].reason
    assert esme.state is State.CLOSED


def test_enquire_link_keeps_and_detects() -> None:
    esme, smsc = bound_pair(enquire_link_s=30.0, response_timeout_s=5.0)
    assert esme.tick(10.0) == [] and esme.data_to_send() == b""
    esme.tick(30.0)
    sent = esme.data_to_send()
    assert decode(sent).command_id == CommandId.ENQUIRE_LINK
    smsc.receive_data(sent, 30.0)
    esme.receive_data(smsc.data_to_send(), 30.1)
    assert esme.tick(40.0) == [] and esme.state is State.BOUND_TRX
    esme.tick(60.2)  # next enquire_link, never answered
    events = esme.tick(65.3)
    assert any(isinstance(e, LinkDead) for e in events)
    assert esme.state is State.CLOSED


def test_unbind_both_ways() -> None:
    esme, smsc = bound_pair()
    esme.send_request(SubmitSm(), 0.0)
    esme.unbind(0.0)
    assert esme.state is State.UNBINDING
    ev_e, ev_s = pump(esme, smsc)
    assert any(isinstance(e, Unbound) for e in ev_s) and smsc.state is State.CLOSED
    assert esme.state is State.CLOSED
    assert any(isinstance(e, Unbound) and not e.by_peer for e in ev_e)


def test_unknown_command_gets_generic_nack_and_bind_stays() -> None:
    _esme, smsc = bound_pair()
    smsc.receive_data(struct.pack(">IIII", 16, 0x00000099, 0, 31), 0.0)
    nack = decode(smsc.data_to_send())
    assert isinstance(nack, GenericNack)
    assert nack.command_status == Status.ESME_RINVCMDID and nack.sequence_number == 31
    assert smsc.state is State.BOUND_TRX


def test_bad_body_gets_command_resp_with_status() -> None:
    _esme, smsc = bound_pair()
    good = encode(SubmitSm(sequence_number=8, tlvs=((0x0501, b"\x02"),)))
    bad = struct.pack(">I", len(good) - 1) + good[4:-1]
    events = smsc.receive_data(bad, 0.0)
    assert isinstance(events[0], ProtocolViolation)
    resp = decode(smsc.data_to_send())
    assert isinstance(resp, SubmitSmResp) and resp.command_status == Status.ESME_RINVOPTPARSTREAM
    assert smsc.state is State.BOUND_TRX


def test_inbound_flood_is_throttled() -> None:
    esme, _smsc = bound_pair(inbound_pending_max=2)
    for i in range(3):
        esme.receive_data(encode(DeliverSm(sequence_number=100 + i)), 0.0)
    out = esme.data_to_send()
    resp = decode(out)
    assert isinstance(resp, DeliverSmResp) and resp.command_status == Status.ESME_RTHROTTLED
    assert resp.sequence_number == 102


def test_sequence_numbers_wrap() -> None:
    esme, _smsc = bound_pair()
    esme._next_seq = 0x7FFFFFFF
    assert esme.send_request(SubmitSm(), 0.0) == 0x7FFFFFFF
    assert esme.send_request(SubmitSm(), 0.0) == 1


def test_connection_lost_fails_pending() -> None:
    esme, _smsc = bound_pair(window_max=1)
    esme.send_request(SubmitSm(), 0.0)
    esme.send_request(SubmitSm(), 0.0)
    events = esme.connection_lost()
    assert sum(isinstance(e, RequestFailed) for e in events) == 2
    assert esme.state is State.CLOSED


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_random_bytes_to_bound_session(data: bytes) -> None:
    esme, smsc = bound_pair()
    for s in (esme, smsc):
        s.receive_data(data, 1.0)
        out = s.data_to_send()
        # whatever it answers decodes
        from extrabalance.smpp.pdu import Framer
        for frame in Framer().feed(out):
            assert isinstance(frame, bytes)
            decode(frame)
        # and unless the framing was hopeless, the bind is still up
        assert s.state in (State.BOUND_TRX, State.CLOSED)


def test_enquire_link_answered_in_open_state() -> None:
    _, smsc = pair()
    smsc.receive_data(encode(EnquireLink(sequence_number=3)), 0.0)
    resp = decode(smsc.data_to_send())
    assert resp.command_id == CommandId.ENQUIRE_LINK_RESP and resp.sequence_number == 3


def test_alert_notification_takes_no_response() -> None:
    from extrabalance.smpp.pdu import AlertNotification

    esme, _smsc = bound_pair()
    events = esme.receive_data(encode(AlertNotification(source_addr="2010", sequence_number=4)), 0)
    assert isinstance(events[0], RequestReceived)
    assert esme.data_to_send() == b""


def test_periodic_enquire_link_goes_out_whatever_the_traffic() -> None:
    """A gateway that polls on its own clock expects ours too: with the periodic
    mode, enquire_link every enquire_link_s even while traffic flows."""
    for periodic, wanted in ((False, 0), (True, 3)):
        esme, smsc = bound_pair(enquire_link_s=10.0, enquire_link_periodic=periodic)
        sent = 0
        for t in range(1, 36):  # a deliver_sm every second: never silent
            smsc.send_request(DeliverSm(), float(t))
            got = esme.receive_data(smsc.data_to_send(), float(t))
            for ev in got:
                esme.send_response(make_response(ev.pdu, 0))  # type: ignore[attr-defined]
            esme.tick(float(t))
            out = esme.data_to_send()
            at = 0
            while at < len(out):  # one PDU after the other: length, command_id, ...
                length, command_id = struct.unpack_from(">II", out, at)
                sent += command_id == CommandId.ENQUIRE_LINK
                at += length
            smsc.receive_data(out, float(t))
            esme.receive_data(smsc.data_to_send(), float(t))
        assert sent == wanted, periodic
