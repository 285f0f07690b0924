"""Codec: round trips, robustness against any bytes, and every RFC validation answer."""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extrabalance.diameter import codec, dictionary
from extrabalance.diameter.codec import (
    Avp,
    DiameterError,
    FrameError,
    Framer,
    Message,
    RawAddress,
    avp,
    decode,
    encode,
    validate,
)
from extrabalance.diameter.constants import (
    AVP_AUTH_APPLICATION_ID,
    AVP_ORIGIN_HOST,
    AVP_PRODUCT_NAME,
    AVP_SESSION_ID,
    AVP_SUBSCRIPTION_ID,
)
from extrabalance.diameter.dictionary import AVP_TABLE, AvpType

from .helpers import sample_ccr

# --- strategies -------------------------------------------------------------------------

_I32 = st.integers(-(2**31), 2**31 - 1)
_VALUES = {
    AvpType.OCTET_STRING: st.binary(max_size=40),
    AvpType.INTEGER32: _I32,
    AvpType.ENUMERATED: _I32,
    AvpType.INTEGER64: st.integers(-(2**63), 2**63 - 1),
    AvpType.UNSIGNED32: st.integers(0, 2**32 - 1),
    AvpType.UNSIGNED64: st.integers(0, 2**64 - 1),
    AvpType.FLOAT32: st.floats(width=32, allow_nan=False),
    AvpType.FLOAT64: st.floats(allow_nan=False),
    AvpType.ADDRESS: st.one_of(
        st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
        st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)),
        st.builds(RawAddress, st.integers(3, 65535), st.binary(max_size=20)),
    ),
    # The folded window of the 32-bit NTP seconds (1968..2104).
    AvpType.TIME: st.integers(2**31, 2**31 + 2**32 - 1),
    AvpType.UTF8_STRING: st.text(max_size=30),
    AvpType.DIAMETER_IDENTITY: st.text(max_size=30),
    AvpType.DIAMETER_URI: st.text(max_size=30),
    AvpType.IP_FILTER_RULE: st.text(max_size=30),
}
_SIMPLE_ROWS = [row for row in AVP_TABLE if row[2] is not AvpType.GROUPED and row[0] != 279]
_GROUPED_ROWS = [row for row in AVP_TABLE if row[2] is AvpType.GROUPED and row[0] != 279]
# Flag bits that must survive a round trip: M, P and the reserved ones (V follows vendor).
_FREE_FLAGS = st.integers(0, 0x7F)


@st.composite
def _known_simple_avp(draw: st.DrawFn) -> Avp:
    code, _name, typ, _m, vendor = draw(st.sampled_from(_SIMPLE_ROWS))
    flags = draw(_FREE_FLAGS) | (0x80 if vendor else 0)
    return avp(code, draw(_VALUES[typ]), vendor, flags=flags)


@st.composite
def _unknown_avp(draw: st.DrawFn) -> Avp:
    vendor = draw(st.sampled_from([0, 0, 10415, 9, 2**32 - 1]))
    code = draw(st.integers(0, 2**32 - 1))
    if dictionary.avp_def(code, vendor) is not None:
        code = 0xFFFFFF00 + (code & 0xFF)  # not in our table
    flags = draw(_FREE_FLAGS) | (0x80 if vendor else 0)
    return avp(code, draw(st.binary(max_size=40)), vendor, flags=flags)


def _grouped(children: st.SearchStrategy[Avp]) -> st.SearchStrategy[Avp]:
    @st.composite
    def build(draw: st.DrawFn) -> Avp:
        code, _n, _t, _m, vendor = draw(st.sampled_from(_GROUPED_ROWS))
        flags = draw(_FREE_FLAGS) | (0x80 if vendor else 0)
        return avp(code, draw(st.lists(children, max_size=4)), vendor, flags=flags)

    return build()


ANY_AVP = st.recursive(
    st.one_of(_known_simple_avp(), _unknown_avp()), _grouped, max_leaves=12
)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    return Message(
        command_code=draw(st.integers(0, 2**24 - 1)),
        flags=draw(st.integers(0, 255)),
        application_id=draw(st.integers(0, 2**32 - 1)),
        hop_by_hop_id=draw(st.integers(0, 2**32 - 1)),
        end_to_end_id=draw(st.integers(0, 2**32 - 1)),
        avps=tuple(draw(st.lists(ANY_AVP, max_size=8))),
    )


# --- round trips ------------------------------------------------------------------------


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_decode_encode_round_trip(msg: Message) -> None:
    data = encode(msg)
    assert len(data) % 4 == 0
    assert decode(data) == msg
    # and the bytes are canonical: encoding again gives the same bytes
    assert encode(decode(data)) == data


def _reference_decode(data: bytes) -> tuple[Avp, ...] | str:
    """The plain decoder alone: no fast path, no caches."""
    try:
        return tuple(codec._decode_avps(data, 20, len(data), 0, None))
    except codec._AvpFault as fault:
        return f"fault {fault.result_code}"


def _fast_decode(data: bytes) -> tuple[Avp, ...] | str:
    try:
        return decode(data).avps
    except DiameterError as err:
        return f"fault {err.result_code}"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages(), min_size=1, max_size=3), st.data())
def test_fast_cached_decoder_agrees_with_the_plain_one(msgs: list[Message],
                                                       data: st.DataObject) -> None:
    # Messages sharing runs of cacheable AVPs (as real traffic does), then mutated.
    shared = sample_ccr().avps[1:9]
    for msg in msgs:
        frame = bytearray(encode(msg._replace(avps=shared + msg.avps + shared)))
        assert _fast_decode(bytes(frame)) == _reference_decode(bytes(frame))
        if data.draw(st.booleans()):
            pos = data.draw(st.integers(20, len(frame) - 1))
            frame[pos] = data.draw(st.integers(0, 255))
            assert _fast_decode(bytes(frame)) == _reference_decode(bytes(frame))


def test_ccr_round_trip_and_accessors() -> None:
    msg = sample_ccr()
    back = decode(encode(msg))
    assert back == msg
    assert back.session_id == msg.get(AVP_SESSION_ID)
    assert back.path_value(437, 413, 445, 447) == 1000
    assert back.path_value(437, 413, 445, 429) == -2
    assert back.path_value(437, 413, 425) == 818
    assert back.path(437, 999) is None
    sub = back.first(AVP_SUBSCRIPTION_ID)
    assert sub is not None and sub.get(444) == "201001234567" and sub.name == "Subscription-Id"
    assert [a.code for a in back.all(AVP_ORIGIN_HOST)] == [AVP_ORIGIN_HOST]
    validate(back)


def test_unknown_avp_kept_as_bytes_and_reencoded_unchanged() -> None:
    raw_avp = struct.pack(">IIIIH", 0x12345678, (0x80 << 24) | 18, 99, 1, 2) + b"\0\0"
    msg = sample_ccr()
    data = bytearray(encode(msg))
    data += raw_avp
    struct.pack_into(">I", data, 0, (1 << 24) | len(data))
    decoded = decode(bytes(data))
    unknown = decoded.avps[-1]
    assert (unknown.code, unknown.vendor_id, unknown.value) == (0x12345678, 99, b"\0\0\0\1\0\2")
    assert encode(decoded) == bytes(data)


def test_time_is_ntp_seconds_with_era_folding() -> None:
    unix_2026 = 1_795_000_000
    ntp = codec.ntp_from_unix(unix_2026)
    assert ntp == unix_2026 + 2_208_988_800
    msg = Message(280, 0x80, 0, 1, 1, (avp(55, ntp),))
    assert decode(encode(msg)).get(55) == ntp
    after_2036 = 2**32 + 5  # era 1: on the wire the top bit is clear
    msg2 = Message(280, 0x80, 0, 1, 1, (avp(55, after_2036),))
    assert encode(msg2)[-4:] == struct.pack(">I", 5)
    assert decode(encode(msg2)).get(55) == after_2036


def test_avp_builder_sets_flags_from_the_dictionary() -> None:
    assert avp(AVP_SESSION_ID, "x").flags == 0x40  # M
    assert avp(AVP_PRODUCT_NAME, "x").flags == 0  # M must not
    assert avp(23, b"\0", 10415).flags == 0x80  # 3GPP-MS-TimeZone: V, M may
    assert avp(873, [], 10415).flags == 0xC0
    assert avp(873, [], 10415).value == ()
    with pytest.raises(ValueError):
        encode(Message(272, 0xC0, 4, 1, 1, (Avp(873, 0x40, 10415, ()),)))
    with pytest.raises(ValueError):
        encode(Message(272, 0xC0, 4, 1, 1, (avp(415, "not a number"),)))


# --- never crash ------------------------------------------------------------------------


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_codec_errors(data: bytes) -> None:
    try:
        msg = decode(data)
    except (FrameError, DiameterError):
        return
    try:
        validate(msg)
    except DiameterError:
        pass


@settings(max_examples=500)
@given(st.data())
def test_mutated_ccr_raises_only_codec_errors(data: st.DataObject) -> None:
    frame = bytearray(encode(sample_ccr()))
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    frame = frame[: max(cut, 20)] if data.draw(st.booleans()) else frame
    try:
        msg = decode(bytes(frame))
    except FrameError:
        return
    except DiameterError as err:
        assert err.partial is not None
        answer = codec.error_answer(err, "node", "realm")
        decode(encode(answer))  # the error answer itself always encodes and decodes
        return
    try:
        validate(msg)
    except DiameterError as err:
        decode(encode(codec.error_answer(err, "node", "realm")))


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages(), min_size=1, max_size=4), st.data())
def test_framer_splits_any_chunking(msgs: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in msgs)
    framer = Framer()
    frames: list[bytes] = []
    pos = 0
    while pos < len(stream):
        step = data.draw(st.integers(1, 256))
        frames += framer.feed(stream[pos : pos + step])
        pos += step
    assert [decode(f) for f in frames] == msgs
    assert framer.buffered_bytes == 0


def test_framer_rejects_bad_headers() -> None:
    with pytest.raises(FrameError):
        Framer().feed(b"\x02\x00\x00\x14" + bytes(16))  # version 2
    with pytest.raises(FrameError):
        Framer().feed(b"\x01\x00\x00\x10" + bytes(16))  # shorter than a header
    with pytest.raises(FrameError):
        Framer(max_message_bytes=1024).feed(b"\x01\x00\x10\x00")  # 4096 > bound
    assert Framer().feed(b"\x01\x00\x00") == []  # not enough to judge yet


# --- validation: one test per result code -----------------------------------------------


def _code(fn: object) -> int:
    with pytest.raises(DiameterError) as info:
        fn()  # type: ignore[operator]
    assert info.value.partial is not None
    return info.value.result_code


def _replace_avp(msg: Message, code: int, new: Avp | None) -> Message:
    avps = [a for a in msg.avps if a.code != code] if new is None else [
        new if a.code == code else a for a in msg.avps]
    return msg._replace(avps=tuple(avps))


def test_3001_command_unsupported() -> None:
    msg = sample_ccr()._replace(command_code=999)
    assert _code(lambda: validate(msg)) == 3001


def test_3007_application_unsupported() -> None:
    msg = sample_ccr()._replace(application_id=16777238)
    assert _code(lambda: validate(msg)) == 3007
    assert _code(lambda: validate(sample_ccr(), applications=(3,))) == 3007


def test_3008_invalid_hdr_bits() -> None:
    assert _code(lambda: validate(sample_ccr().with_flags(codec.FLAG_ERROR))) == 3008
    no_p = sample_ccr().with_flags(clear_flags=codec.FLAG_PROXIABLE)
    assert _code(lambda: validate(no_p)) == 3008


def test_5013_reserved_header_bits() -> None:
    assert _code(lambda: validate(sample_ccr().with_flags(0x01))) == 5013


def test_3009_invalid_avp_bits() -> None:
    msg = sample_ccr()._replace(avps=sample_ccr().avps + (avp(AVP_PRODUCT_NAME, "x", flags=0x40),))
    with pytest.raises(DiameterError) as info:
        validate(msg)
    assert info.value.result_code == 3009
    assert info.value.failed_avps[0].code == AVP_PRODUCT_NAME
    v_without_vendor = avp(AVP_ORIGIN_HOST, "h", flags=0xC0)
    msg = _replace_avp(sample_ccr(), AVP_ORIGIN_HOST, v_without_vendor)
    assert _code(lambda: validate(decode(encode(msg)))) == 3009


def test_5001_unknown_avp_with_m_bit() -> None:
    odd = avp(0xFFFFFF01, b"x", flags=0x40)
    msg = sample_ccr()._replace(avps=sample_ccr().avps + (odd,))
    with pytest.raises(DiameterError) as info:
        validate(decode(encode(msg)))
    assert info.value.result_code == 5001 and info.value.failed_avps == (odd,)
    # without the M bit it is simply ignored
    validate(sample_ccr()._replace(avps=sample_ccr().avps + (avp(0xFFFFFF01, b"x"),)))


def test_5004_invalid_avp_value() -> None:
    data = bytearray(encode(sample_ccr()))
    pos = data.index(b"201001234567")
    data[pos] = 0xFF  # invalid UTF-8 inside Subscription-Id-Data
    with pytest.raises(DiameterError) as info:
        decode(bytes(data))
    assert info.value.result_code == 5004
    assert info.value.partial is not None and info.value.partial.session_id is not None


def test_5005_missing_avp_with_failed_avp_example() -> None:
    msg = _replace_avp(sample_ccr(), AVP_ORIGIN_HOST, None)
    with pytest.raises(DiameterError) as info:
        validate(msg)
    err = info.value
    assert err.result_code == 5005
    assert err.failed_avps == (avp(AVP_ORIGIN_HOST, "000"),)
    answer = codec.error_answer(err, "node", "realm")
    assert not answer.is_error and not answer.is_request
    assert answer.path_value(279, AVP_ORIGIN_HOST) == "000"
    assert answer.get(268) == 5005
    # inside a grouped AVP: Subscription-Id without its Data
    msg = _replace_avp(sample_ccr(), AVP_SUBSCRIPTION_ID, avp(AVP_SUBSCRIPTION_ID, [avp(450, 0)]))
    assert _code(lambda: validate(msg)) == 5005


def test_5009_avp_occurs_too_many_times() -> None:
    msg = sample_ccr()._replace(avps=sample_ccr().avps + (avp(AVP_ORIGIN_HOST, "again"),))
    with pytest.raises(DiameterError) as info:
        validate(msg)
    assert info.value.result_code == 5009
    assert info.value.failed_avps == (avp(AVP_ORIGIN_HOST, "again"),)


def test_5014_invalid_avp_length() -> None:
    data = bytearray(encode(sample_ccr()))
    # Auth-Application-Id (Unsigned32) claiming 10 bytes instead of 12
    pos = data.index(struct.pack(">I", AVP_AUTH_APPLICATION_ID) + b"\x40\x00\x00\x0c")
    data[pos + 7] = 10
    with pytest.raises(DiameterError) as info:
        decode(bytes(data))
    assert info.value.result_code == 5014
    assert info.value.failed_avps[0].code == AVP_AUTH_APPLICATION_ID
    # an AVP length running past the end of the message
    data = bytearray(encode(sample_ccr()))
    data[20 + 5 : 20 + 8] = b"\x00\xff\xff"
    assert _code(lambda: decode(bytes(data))) == 5014
    # and an error answer carrying the broken AVP still encodes and decodes
    with pytest.raises(DiameterError) as info:
        decode(bytes(data))
    back = decode(encode(codec.error_answer(info.value, "n", "r")))
    assert back.get(268) == 5014 and back.first(279) is not None


def test_5015_invalid_message_length() -> None:
    data = encode(sample_ccr())
    assert _code(lambda: decode(data + b"\0\0\0\0")) == 5015  # frame longer than header says
    odd = bytearray(data[:-2])
    struct.pack_into(">I", odd, 0, (1 << 24) | len(odd))
    assert _code(lambda: decode(bytes(odd))) == 5015  # not a multiple of 4


def test_frame_errors_are_connection_level() -> None:
    data = bytearray(encode(sample_ccr()))
    data[0] = 2
    with pytest.raises(FrameError):
        decode(bytes(data))
    with pytest.raises(FrameError):
        decode(b"\x01\x00\x00")


def test_error_answer_sets_e_bit_only_for_3xxx() -> None:
    req = sample_ccr().with_ids(7, 9)
    e3 = codec.error_answer(DiameterError(3001, "x", partial=req), "n", "r")
    e5 = codec.error_answer(DiameterError(5005, "x", partial=req), "n", "r")
    assert e3.is_error and not e5.is_error
    assert (e3.hop_by_hop_id, e3.end_to_end_id) == (7, 9)
    assert e3.is_proxiable and not e3.is_request


def test_generated_constants_are_current() -> None:
    out = subprocess.run([sys.executable, "-m", "extrabalance.diameter.dictionary"],
                         capture_output=True, text=True, check=True).stdout
    with open(codec.__file__.replace("codec.py", "constants.py"), encoding="utf-8") as f:
        assert f.read() == out


def test_describe_names_avps() -> None:
    text = codec.describe(sample_ccr())
    assert "Credit-Control-Request" in text and "Value-Digits: 1000" in text
