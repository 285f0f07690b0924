"""Text coding tests: GSM 03.38 round trips, UCS2, splitting, reassembly, receipts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extrabalance.smpp import text as t
from extrabalance.smpp.pdu import EsmClass, Tag, tlv_u8, tlv_u16

ALL_GSM = t._GSM7_BASIC.replace("\x1b", "") + "".join(t._GSM7_EXTENSION.values())


def test_whole_alphabet_round_trips_unpacked() -> None:
    octets = t.gsm7_encode(ALL_GSM)
    assert all(b <= 0x7F for b in octets)  # one septet per octet
    assert len(octets) == t.gsm7_length(ALL_GSM) == 127 + 2 * 10
    assert t.gsm7_decode(octets) == ALL_GSM
    assert t.decode_text(0x00, octets) == ALL_GSM
    assert t.decode_text(0x0F, octets) == ALL_GSM


@given(st.binary(max_size=300))
def test_decode_fast_path_equals_septet_by_septet(octets: bytes) -> None:
    assert t.gsm7_decode(octets) == t._gsm7_decode_each(octets)
    unescaped = bytes(b & 0x7F for b in octets).replace(b"\x1b", b"")
    assert t.gsm7_decode(unescaped) == t._gsm7_decode_each(unescaped)


def test_known_septets() -> None:
    assert t.gsm7_encode("@$€{") == b"\x00\x02\x1b\x65\x1b\x28"
    assert t.gsm7_encode("¤") == b"\x24"


def test_packed_helpers() -> None:
    # 3GPP TS 23.038 example: "hellohello" packs to e8329bfd4697d9ec37
    assert t.pack_septets(t.gsm7_encode("hellohello")).hex() == "e8329bfd4697d9ec37"
    assert t.unpack_septets(bytes.fromhex("e8329bfd4697d9ec37"), 10) == t.gsm7_encode("hellohello")


def test_packed_ussd_string_is_recognised() -> None:
    packed = t.pack_septets(t.gsm7_encode("*123*2#"))
    assert t.decode_text(0x0F, packed) == "*123*2#"


@given(st.text(alphabet=ALL_GSM, max_size=300))
@settings(max_examples=200)
def test_gsm_round_trip_property(text: str) -> None:
    dc, octets = t.choose_coding(text)
    assert dc == 0
    assert t.decode_text(dc, octets) == text
    assert t.unpack_septets(t.pack_septets(octets), len(octets)) == octets


def test_arabic_goes_ucs2() -> None:
    dc, octets = t.choose_coding("رصيدك 5 جنيه")
    assert dc == 8
    assert octets == "رصيدك 5 جنيه".encode("utf-16-be")
    assert t.decode_text(8, octets) == "رصيدك 5 جنيه"
    with pytest.raises(t.TextCodingError):
        t.gsm7_encode("ر")


def test_other_codings() -> None:
    assert t.decode_text(0x01, b"LOAN 10") == "LOAN 10"
    assert t.decode_text(0x03, "Café".encode("latin-1")) == "Café"
    assert t.decode_text(0x04, "قرض".encode()) == "قرض"
    assert t.decode_text(0x04, b"\xff\xfe") == "ÿþ"


def _reassemble(segments: list[t.SmsSegment], source: str = "201001234567") -> str | None:
    r = t.Reassembler()
    out = None
    for seg in reversed(segments):  # out of order on purpose
        info, body = t.parse_concat(seg.esm_class, seg.short_message)
        assert info is not None
        out = r.feed(source, info, t.decode_text(seg.data_coding, body), now_s=0.0) or out
    assert len(r) == 0
    return out


def test_short_text_is_one_segment() -> None:
    segs = t.split_text("x" * 160, reference=1)
    assert len(segs) == 1 and segs[0].esm_class == 0
    segs = t.split_text("ر" * 70, reference=1)
    assert len(segs) == 1 and segs[0].data_coding == 8


def test_long_gsm_split_and_reassembled() -> None:
    text = ("Your Extra Balance of 10.00 EGP is ready. {fee} €1 " * 12).strip()
    segs = t.split_text(text, reference=0x1AB)
    assert len(segs) > 1
    for s in segs:
        assert s.esm_class & EsmClass.UDHI
        assert s.short_message[:4] == b"\x05\x00\x03\xab"
        assert len(s.short_message) - 6 <= t.GSM7_PART_MAX
        assert s.short_message[-1] != 0x1B  # an escape pair is never cut
    assert _reassemble(segs) == text


def test_long_ucs2_split_and_reassembled() -> None:
    text = "تم تحويل رصيد إضافي بقيمة ١٠ جنيه 😀 " * 8
    segs = t.split_text(text, reference=7)
    assert all(s.data_coding == 8 and len(s.short_message) - 6 <= 134 for s in segs)
    assert _reassemble(segs) == text


def test_16_bit_reference_udh() -> None:
    parts = ["first half, ", "second half"]
    r = t.Reassembler()
    out = None
    for i, p in enumerate(parts):
        sm = bytes((6, 0x08, 4, 0x12, 0x34, 2, i + 1)) + t.gsm7_encode(p)
        info, body = t.parse_concat(EsmClass.UDHI, sm)
        assert info == t.ConcatInfo(0x1234, 2, i + 1)
        out = r.feed("2010", info, t.decode_text(0, body), now_s=1.0) or out
    assert out == "first half, second half"


def test_sar_tlvs() -> None:
    tlvs = (tlv_u16(Tag.SAR_MSG_REF_NUM, 9), tlv_u8(Tag.SAR_TOTAL_SEGMENTS, 2),
            tlv_u8(Tag.SAR_SEGMENT_SEQNUM, 2))
    info, body = t.parse_concat(0, b"abc", tlvs)
    assert info == t.ConcatInfo(9, 2, 2) and body == b"abc"


def test_message_payload_mode() -> None:
    segs = t.split_text("y" * 400, reference=3, use_message_payload=True)
    assert len(segs) == 1 and segs[0].message_payload == b"y" * 400 and segs[0].short_message == b""


def test_reassembler_is_bounded_and_expires() -> None:
    r = t.Reassembler(entries_max=2, timeout_s=10.0)
    for ref in range(3):
        assert r.feed("a", t.ConcatInfo(ref, 2, 1), "x", now_s=float(ref)) is None
    assert len(r) == 2 and r.dropped_count == 1
    assert r.expire(now_s=11.0) == 1
    assert r.expire(now_s=100.0) == 1
    assert len(r) == 0


def test_malformed_udh_does_not_raise() -> None:
    assert t.parse_concat(EsmClass.UDHI, b"\x05\x00\x03")[0] is None
    assert t.parse_concat(EsmClass.UDHI, b"\x05\x00\x03\x01\x02\x05hi")[0] is None


def test_delivery_receipt() -> None:
    r = t.parse_receipt(
        "id:0123456789 sub:001 dlvrd:001 submit date:2611251015 done date:2611251016 "
        "stat:DELIVRD err:000 text:Your Extra Balance"
    )
    assert r == t.DeliveryReceipt("0123456789", 1, 1, "2611251015", "2611251016",
                                  "DELIVRD", "000", "Your Extra Balance")
    assert t.parse_receipt("id:abc stat:undeliv err:012").stat == "UNDELIV"  # type: ignore[union-attr]
    assert t.parse_receipt("LOAN 10") is None


def test_receipt_from_deliver_prefers_tlvs() -> None:
    from extrabalance.smpp.pdu import DeliverSm, tlv_cstr

    text = b"id:123 sub:001 dlvrd:000 submit date:2611251015 done date:2611251016 stat:UNDELIV err:001 text:x"
    pdu = DeliverSm(esm_class=0x04, short_message=text,
                    tlvs=(tlv_cstr(Tag.RECEIPTED_MESSAGE_ID, "7B"), tlv_u8(Tag.MESSAGE_STATE, 2)))
    r = t.receipt_from_deliver(pdu)
    assert r is not None and r.message_id == "7B" and r.stat == "DELIVRD" and r.err == "001"
    assert t.receipt_from_deliver(DeliverSm(short_message=text)) is None  # not a receipt
    only_tlv = DeliverSm(esm_class=0x04, tlvs=(tlv_cstr(Tag.RECEIPTED_MESSAGE_ID, "9"),))
    assert t.receipt_from_deliver(only_tlv).message_id == "9"  # type: ignore[union-attr]
