"""Codec tests: byte-for-byte agreement with smpplib, round trips, hostile input."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extrabalance.smpp import pdu as m
from extrabalance.smpp.pdu import (
    BindTransceiver,
    CommandId,
    DataSm,
    DeliverSm,
    EnquireLink,
    Framer,
    GenericNack,
    ItsSessionInfo,
    PduDecodeError,
    PduEncodeError,
    Status,
    SubmitSm,
    SubmitSmResp,
    Tag,
    TlvValueError,
    UssdOp,
    decode,
    encode,
    make_response,
    tlv_u8,
    tlv_u16,
)

smpplib_smpp = pytest.importorskip("smpplib.smpp")


class _Seq:
    """smpplib takes its sequence numbers from a client object."""

    def __init__(self, sequence: int) -> None:
        self.sequence = sequence

    def next_sequence(self) -> int:
        return self.sequence


def _lib(name: str, seq: int, **kw: object) -> bytes:
    return smpplib_smpp.make_pdu(name, client=_Seq(seq), **kw).generate()


MENU = b"1. Borrow 5 EGP\n2. Borrow 10 EGP\n3. Balance"


# --- cross-check against smpplib ------------------------------------------------

def test_bind_transceiver_matches_smpplib() -> None:
    ours = encode(BindTransceiver(system_id="extrabal", password="secret", system_type="USSD",
                                  addr_ton=1, addr_npi=1, address_range="", sequence_number=1))
    theirs = _lib("bind_transceiver", 1, system_id="extrabal", password="secret",
                  system_type="USSD", addr_ton=1, addr_npi=1, address_range="")
    assert ours == theirs
    back = decode(theirs)
    assert isinstance(back, BindTransceiver) and back.interface_version == 0x34


def test_submit_sm_with_ussd_tlvs_matches_smpplib() -> None:
    ours = SubmitSm(
        service_type="USSD", source_addr_ton=1, source_addr_npi=1, source_addr="1234",
        dest_addr_ton=1, dest_addr_npi=1, destination_addr="201001234567",
        data_coding=0x0F, short_message=MENU, sequence_number=9,
        # smpplib emits TLVs in its own fixed order; we keep ours as given.
        tlvs=(ItsSessionInfo(42, 1, False).as_tlv(), tlv_u8(Tag.USSD_SERVICE_OP, UssdOp.USSR_REQUEST)),
    )
    theirs = _lib(
        "submit_sm", 9, service_type="USSD", source_addr_ton=1, source_addr_npi=1,
        source_addr="1234", dest_addr_ton=1, dest_addr_npi=1, destination_addr="201001234567",
        esm_class=0, protocol_id=0, priority_flag=0, schedule_delivery_time="",
        validity_period="", registered_delivery=0, replace_if_present_flag=0,
        data_coding=0x0F, sm_default_msg_id=0, short_message=MENU,
        its_session_info=(42 << 8) | (1 << 1), ussd_service_op=2,
    )
    assert encode(ours) == theirs
    assert decode(theirs) == ours
    parsed = smpplib_smpp.parse_pdu(encode(ours), client=_Seq(9))
    assert parsed.ussd_service_op == 2 and parsed.its_session_info == 0x2A02


def test_deliver_sm_matches_smpplib_where_it_can_encode() -> None:
    ours = DeliverSm(
        service_type="USSD", source_addr_ton=1, source_addr_npi=1, source_addr="201001234567",
        destination_addr="123", data_coding=0x0F, short_message=b"*123#",
        sequence_number=77,
        tlvs=(tlv_u16(Tag.USER_MESSAGE_REFERENCE, 513), ItsSessionInfo(7, 0).as_tlv()),
    )
    theirs = _lib(
        "deliver_sm", 77, service_type="USSD", source_addr_ton=1, source_addr_npi=1,
        source_addr="201001234567", dest_addr_ton=0, dest_addr_npi=0, destination_addr="123",
        esm_class=0, protocol_id=0, priority_flag=0, schedule_delivery_time="",
        validity_period="", registered_delivery=0, replace_if_present_flag=0,
        data_coding=0x0F, sm_default_msg_id=0, short_message=b"*123#",
        user_message_reference=513, its_session_info=7 << 8,
    )
    assert encode(ours) == theirs
    assert decode(theirs) == ours


def test_deliver_sm_with_ussd_service_op_decodes_where_smpplib_fails() -> None:
    pdu = DeliverSm(source_addr="201001234567", destination_addr="123", data_coding=0x0F,
                    short_message=b"*123#", sequence_number=3,
                    tlvs=(tlv_u8(Tag.USSD_SERVICE_OP, 1), ItsSessionInfo(200, 0).as_tlv(),
                          (0x1401, b"vendor")))
    wire = encode(pdu)
    with pytest.raises(KeyError):  # smpplib: DeliverSM has no ussd_service_op param
        smpplib_smpp.parse_pdu(wire, client=_Seq(3))
    back = decode(wire)
    assert back == pdu
    assert back.ussd_service_op == UssdOp.PSSR_INDICATION
    assert back.its_session_info == ItsSessionInfo(200, 0, False)
    assert back.tlv(0x1401) == b"vendor"
    assert encode(back) == wire  # unknown vendor TLV re-encoded unchanged


def test_data_sm_matches_smpplib() -> None:
    ours = DataSm(service_type="", source_addr="1234", destination_addr="201001234567",
                  esm_class=0, registered_delivery=1, data_coding=8, sequence_number=5,
                  tlvs=((Tag.MESSAGE_PAYLOAD, "مرحبا".encode("utf-16-be")),))
    theirs = _lib("data_sm", 5, service_type="", source_addr_ton=0, source_addr_npi=0,
                  source_addr="1234", dest_addr_ton=0, dest_addr_npi=0,
                  destination_addr="201001234567", esm_class=0, registered_delivery=1,
                  data_coding=8, message_payload="مرحبا".encode("utf-16-be"))
    assert encode(ours) == theirs
    assert decode(theirs) == ours


def test_enquire_link_matches_smpplib() -> None:
    assert encode(EnquireLink(sequence_number=0x7FFFFFFF)) == _lib("enquire_link", 0x7FFFFFFF)
    resp = make_response(EnquireLink(sequence_number=12))
    assert encode(resp) == _lib("enquire_link_resp", 12)


def test_submit_sm_resp_matches_smpplib() -> None:
    ours = SubmitSmResp(message_id="abc123", sequence_number=4)
    assert encode(ours) == _lib("submit_sm_resp", 4, message_id="abc123")
    assert decode(_lib("submit_sm_resp", 4, message_id="abc123")) == ours


# --- semantics -----------------------------------------------------------------

def test_its_session_info_layout() -> None:
    info = ItsSessionInfo(session_number=0xAB, sequence_number=5, end_of_session=True)
    assert info.to_bytes() == bytes((0xAB, (5 << 1) | 1))
    assert ItsSessionInfo.from_bytes(b"\x01\x0b") == ItsSessionInfo(1, 5, True)
    with pytest.raises(TlvValueError):
        ItsSessionInfo.from_bytes(b"\x01")


def test_typed_accessor_rejects_wrong_tlv_size() -> None:
    p = DeliverSm(tlvs=((Tag.USSD_SERVICE_OP, b"\x00\x01"),))
    with pytest.raises(TlvValueError) as info:
        _ = p.ussd_service_op
    assert info.value.status == Status.ESME_RINVPARLEN


def test_error_response_without_body_decodes() -> None:
    wire = struct.pack(">IIII", 16, CommandId.SUBMIT_SM_RESP, Status.ESME_RTHROTTLED, 8)
    p = decode(wire)
    assert p == SubmitSmResp(command_status=Status.ESME_RTHROTTLED, sequence_number=8)


def test_construction_validates() -> None:
    with pytest.raises(PduEncodeError):
        SubmitSm(source_addr="1" * 21)
    with pytest.raises(PduEncodeError):
        SubmitSm(short_message=b"x" * 255)
    with pytest.raises(PduEncodeError):
        SubmitSm(esm_class=256)
    with pytest.raises(PduEncodeError):
        SubmitSm(service_type="US\0SD")
    ok = SubmitSm(tlvs=[(0x0501, bytearray(b"\x02"))])  # lists/bytearrays normalised
    assert ok.tlvs == ((0x0501, b"\x02"),)


def test_unknown_command_id_error_carries_sequence() -> None:
    wire = struct.pack(">IIII", 16, 0x00000077, 0, 4242)
    with pytest.raises(PduDecodeError) as info:
        decode(wire)
    assert info.value.status == Status.ESME_RINVCMDID
    assert info.value.sequence_number == 4242
    assert info.value.answer_with_generic_nack


def test_bad_field_error_names_the_status() -> None:
    good = encode(SubmitSm(source_addr="201001234567", sequence_number=6))
    # service_type without its NUL in 6 octets: "USSDXXX..."
    bad = good[:16] + b"ABCDEFGH" + good[17:]
    bad = struct.pack(">I", len(bad)) + bad[4:]
    with pytest.raises(PduDecodeError) as info:
        decode(bad)
    assert info.value.status == Status.ESME_RINVSERTYP
    assert info.value.sequence_number == 6
    assert not info.value.answer_with_generic_nack


def test_broken_tlv_stream() -> None:
    good = encode(SubmitSm(sequence_number=2, tlvs=(tlv_u8(Tag.USSD_SERVICE_OP, 2),)))
    bad = good[:-1]
    bad = struct.pack(">I", len(bad)) + bad[4:]
    with pytest.raises(PduDecodeError) as info:
        decode(bad)
    assert info.value.status == Status.ESME_RINVOPTPARSTREAM


def test_fast_and_generic_paths_agree() -> None:
    p = SubmitSm(service_type="CMT", source_addr="1", destination_addr="2", esm_class=0x40,
                 schedule_delivery_time="000001000000000R", validity_period="",
                 short_message=b"\x05\x00\x03\x01\x02\x01hi", sequence_number=1,
                 tlvs=((0x0204, b"\x00\x01"),))
    wire = encode(p)
    assert m._encode_generic(p, m._SM_LAYOUT) == wire[16:-6]
    assert m._decode_generic(SubmitSm, wire, 4, 0, 1) == decode(wire) == p


# --- framer -----------------------------------------------------------------------

def test_framer_splits_and_joins() -> None:
    a = encode(EnquireLink(sequence_number=1))
    b = encode(SubmitSm(short_message=b"x" * 200, sequence_number=2))
    stream = a + b + a
    f = Framer()
    frames: list[object] = []
    for i in range(0, len(stream), 7):
        frames += f.feed(stream[i:i + 7])
    assert frames == [a, b, a]
    assert f.buffered == 0


def test_framer_skips_oversized_pdu_and_keeps_going() -> None:
    f = Framer(command_length_max=100)
    big = struct.pack(">IIII", 500, CommandId.SUBMIT_SM, 0, 33) + b"\0" * 484
    ok = encode(EnquireLink(sequence_number=34))
    out = f.feed(big[:50]) + f.feed(big[50:]) + f.feed(ok)
    assert isinstance(out[0], PduDecodeError)
    assert out[0].status == Status.ESME_RINVCMDLEN and out[0].sequence_number == 33
    assert not out[0].fatal
    assert out[1:] == [ok]


def test_framer_short_length_is_fatal() -> None:
    out = Framer().feed(struct.pack(">IIII", 8, 0x15, 0, 1))
    assert len(out) == 1 and isinstance(out[0], PduDecodeError) and out[0].fatal


# --- properties -------------------------------------------------------------------

def _cstr(max_octets: int) -> st.SearchStrategy[str]:
    return st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=max_octets - 1)


_u8 = st.integers(0, 255)
_tlvs = st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=4).map(tuple)


def _strategy_for(cls: type) -> st.SearchStrategy[object]:
    kwargs: dict[str, st.SearchStrategy[object]] = {
        "tlvs": _tlvs,
        "command_status": st.integers(0, 0xFFFFFFFF),
        "sequence_number": st.integers(0, 0xFFFFFFFF),
    }
    for name, kind, size, _ in m._LAYOUT[cls]:
        if kind == m._C:
            kwargs[name] = _cstr(size)
        elif kind == m._U8:
            kwargs[name] = _u8
        else:
            kwargs[name] = st.binary(max_size=size)
    return st.builds(cls, **kwargs)


any_pdu = st.one_of([_strategy_for(cls) for cls in m._LAYOUT])


@given(any_pdu)
@settings(max_examples=400)
def test_roundtrip(p: m.Pdu) -> None:
    wire = encode(p)
    back = decode(wire)
    # an error response with no mandatory body is the only lossy shape: not produced here
    assert back == p
    assert encode(back) == wire


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_random_bytes_only_raise_codec_errors(data: bytes) -> None:
    try:
        decode(data)
    except PduDecodeError:
        pass
    for item in Framer().feed(data):
        if isinstance(item, bytes):
            try:
                decode(item)
            except PduDecodeError:
                pass


@given(any_pdu, st.data())
@settings(max_examples=300)
def test_truncated_and_mangled_pdus(p: m.Pdu, data: st.DataObject) -> None:
    wire = bytearray(encode(p))
    cut = data.draw(st.integers(16, len(wire)))
    frame = bytearray(wire[:cut])
    frame[0:4] = struct.pack(">I", len(frame))
    if len(frame) > 16:
        pos = data.draw(st.integers(16, len(frame) - 1))
        frame[pos] = data.draw(_u8)
    try:
        back = decode(bytes(frame))
    except PduDecodeError as exc:
        assert exc.sequence_number == p.sequence_number
        assert exc.command_id == p.command_id
    else:
        assert type(back) is type(p)


def test_replace_keeps_validation() -> None:
    p = SubmitSm(source_addr="1")
    with pytest.raises(PduEncodeError):
        dataclasses.replace(p, destination_addr="9" * 30)
    assert isinstance(make_response(GenericNack(sequence_number=1)), GenericNack)


# Field values around the edges: right and wrong types, lengths at and past the limit,
# NUL and non-ASCII text, enum members.
_any_value = st.one_of(
    st.integers(-1, 0x1_0000_0000), st.sampled_from([Status.ESME_RTHROTTLED, 255, 256]),
    st.text(max_size=70), st.binary(max_size=300), st.builds(bytearray, st.binary(max_size=4)),
    st.none(),
)


def _valid_value(cls: type, name: str) -> st.SearchStrategy[object]:
    if name == "tlvs":
        return _tlvs
    if name in ("command_status", "sequence_number"):
        return st.integers(0, 0xFFFFFFFF)
    kind, size = next((k, sz) for n, k, sz, _ in m._LAYOUT[cls] if n == name)
    return _cstr(size) if kind == m._C else _u8 if kind == m._U8 else st.binary(max_size=size)


@given(st.sampled_from(list(m._LAYOUT)), st.data())
@settings(max_examples=600, deadline=None)
def test_fast_check_accepts_only_what_the_full_check_accepts(cls: type, data: st.DataObject) -> None:
    """`_fits` (every PDU built on the hot path) may send a PDU to the full check, but
    never passes one that the full check would refuse or change. Every field valid but
    at most one, which takes a value around the edges."""
    shell = object.__new__(cls)
    names = ["tlvs", "command_status", "sequence_number",
             *(name for name, _, _, _ in m._LAYOUT[cls])]
    odd = data.draw(st.sampled_from([None, *names]))
    for name in names:
        if name != odd:
            value = data.draw(_valid_value(cls, name))
        elif name == "tlvs":
            value = data.draw(st.lists(st.tuples(_any_value, _any_value), max_size=2).map(tuple))
        else:
            value = data.draw(_any_value)
        object.__setattr__(shell, name, value)
    if not m._fits(shell):
        return
    before = {name: getattr(shell, name) for name in names}
    m._validate_slowly(shell)  # raises PduEncodeError if the fast check was wrong
    assert {name: getattr(shell, name) for name in names} == before
    assert all(type(getattr(shell, n)) is type(v) for n, v in before.items())


def test_the_node_s_pdus_take_the_fast_check() -> None:
    from extrabalance.smpp.ussd import ussd_deliver, ussd_submit

    screen = ussd_submit("201000000001", "123", "1. 10 EGP\n2. 20 EGP",
                         session=ItsSessionInfo(5, 2, False), user_message_reference=7)
    assert m._fits(screen)
    assert m._fits(make_response(screen))
    gateway_input = ussd_deliver("201000000001", "*123#", "1",
                                 session=ItsSessionInfo(5, 1, False), user_message_reference=7)
    assert m._fits(gateway_input)
    assert all(type(tag) is int for tag, _ in screen.tlvs + gateway_input.tlvs)
    assert m._fits(SubmitSmResp(sequence_number=5, message_id="abc123"))
    throttled = SubmitSmResp(command_status=Status.ESME_RTHROTTLED)  # an enum member ...
    assert type(throttled.command_status) is int and m._fits(throttled)  # ... normalised
    object.__setattr__(throttled, "command_status", Status.ESME_RTHROTTLED)
    assert not m._fits(throttled)  # a value to normalise goes to the full check


@given(st.sampled_from([m.SubmitSm, m.DeliverSm]), st.data())
@settings(max_examples=300, deadline=None)
def test_build_sm_is_the_constructor(cls: type, data: st.DataObject) -> None:
    """`build_sm` (the node's USSD screens and SMS) builds what the dataclass does, and
    refuses what it refuses, with every field valid but at most one."""
    names = ["tlvs", "command_status", "sequence_number",
             *(name for name, _, _, _ in m._LAYOUT[cls])]
    odd = data.draw(st.sampled_from([None, *names]))
    kwargs = {name: data.draw(_valid_value(cls, name) if name != odd else _any_value)
              for name in names}
    try:
        expected = cls(**kwargs)
    except PduEncodeError:
        with pytest.raises(PduEncodeError):
            m.build_sm(cls, **kwargs)
        return
    built = m.build_sm(cls, **kwargs)
    assert type(built) is cls and built == expected
    assert all(type(getattr(built, n)) is type(getattr(expected, n)) for n in names)
    assert encode(built) == encode(expected)


@given(st.sampled_from(sorted(m.RESPONSE_CLASS, key=int)), st.data())
@settings(max_examples=300, deadline=None)
def test_make_response_is_the_constructor(command_id: int, data: st.DataObject) -> None:
    """`make_response` fills the response's slots: what the dataclass builds, with the
    same check (a field past its bounds is refused, an enum member normalised)."""
    cls = m.RESPONSE_CLASS[command_id]
    request = object.__new__(m.PDU_CLASSES[command_id])
    object.__setattr__(request, "sequence_number", data.draw(st.integers(0, 0xFFFFFFFF)))
    status = data.draw(st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from(list(Status)),
                                 st.integers(-1, -1)))
    fields = {name: data.draw(_valid_value(cls, name) if data.draw(st.booleans())
                              else _any_value)
              for name, _, _, _ in m._LAYOUT[cls] if data.draw(st.booleans())}
    try:
        expected = cls(command_status=status, sequence_number=request.sequence_number,
                       **fields)
    except PduEncodeError:
        with pytest.raises(PduEncodeError):
            make_response(request, status, **fields)
        return
    built = make_response(request, status, **fields)
    assert type(built) is cls and built == expected
    assert all(type(getattr(built, f.name)) is type(getattr(expected, f.name))
               for f in dataclasses.fields(cls))
    with pytest.raises(TypeError):
        make_response(request, 0, no_such_field=1)
