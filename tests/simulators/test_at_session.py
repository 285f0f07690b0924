"""The modem's AT session (sans-IO): framing, commands, +CUSD, SMS, encodings."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extrabalance.smpp.text import TextCodingError, is_gsm7
from simulators.at_session import (
    Alphabet,
    AtSession,
    CommandError,
    CommandOk,
    CommandTimeout,
    Discarded,
    SmsReceived,
    Unsolicited,
    UssdEncoding,
    UssdResult,
    UssdStatus,
    cbs_alphabet,
    decode_ussd,
    encode_ussd,
    pack_ussd,
    parse_cusd,
    split_fields,
    unpack_ussd,
)

GSM_TEXT = st.text(
    alphabet=st.characters(codec="utf-8").filter(lambda ch: is_gsm7(ch)), max_size=200
)


# --- encodings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "packed_hex"),
    # as Huawei sticks take them (and as operators' forums quote them)
    [("*100#", "AA180C3602"), ("*144#", "AA188D3602"), ("*888#", "2A1C0E3702")],
)
def test_packed_gsm7_hex_known_codes(code: str, packed_hex: str) -> None:
    assert encode_ussd(code, UssdEncoding.GSM7_HEX) == packed_hex
    assert decode_ussd(packed_hex, 15, UssdEncoding.GSM7_HEX) == code


def test_seven_spare_bits_carry_a_cr_not_an_at_sign() -> None:
    packed = pack_ussd("1234567")  # 49 bits: 7 spare bits in the 7th octet
    assert len(packed) == 7 and packed[-1] >> 1 == 0x0D
    assert unpack_ussd(packed) == "1234567"
    assert unpack_ussd(pack_ussd("abcdef@")) == "abcdef@"


@given(GSM_TEXT.filter(lambda t: not t.endswith("\r")))
def test_packed_gsm7_round_trip(text: str) -> None:
    assert unpack_ussd(pack_ussd(text)) == text
    encoded = encode_ussd(text, UssdEncoding.GSM7_HEX)
    assert decode_ussd(encoded, 15, UssdEncoding.GSM7_HEX) == text.replace("\r", "\n")


@given(GSM_TEXT)
def test_a_final_cr_survives_as_one_or_two_crs(text: str) -> None:
    # TS 23.038 §6.1.2.3.1: <CR><CR> means the same as <CR> to the receiver
    assert unpack_ussd(pack_ussd(text)).rstrip("\r") == text.rstrip("\r")


@given(st.text(max_size=100))
def test_ucs2_hex_round_trip(text: str) -> None:
    encoded = encode_ussd(text, UssdEncoding.UCS2_HEX)
    assert decode_ussd(encoded, 15, UssdEncoding.UCS2_HEX) == (
        text.encode("utf-16-be").decode("utf-16-be", errors="replace")
        .replace("\r\n", "\n").replace("\r", "\n")
    )


def test_answers_are_decoded_by_their_dcs() -> None:
    arabic = "رصيدك"
    ucs2_hex = arabic.encode("utf-16-be").hex()
    for encoding in UssdEncoding:  # UCS2 and 8-bit are hex octets whatever AT+CSCS is
        assert decode_ussd(ucs2_hex, 72, encoding) == arabic
        assert decode_ussd("4F4B", 0x44, encoding) == "OK"
    assert decode_ussd("C2F2" + ucs2_hex, 0x11, UssdEncoding.TEXT) == arabic  # "ar" first
    assert decode_ussd("EN\rHello", 0x10, UssdEncoding.TEXT) == "Hello"
    assert decode_ussd("Menu\r\n1 Borrow\r2 Pay", 15, UssdEncoding.TEXT) == "Menu\n1 Borrow\n2 Pay"
    assert decode_ussd("not hex", 15, UssdEncoding.GSM7_HEX) == "not hex"  # shown as sent
    assert decode_ussd("not hex", 72, UssdEncoding.TEXT) == "not hex"
    assert decode_ussd("0031", None, UssdEncoding.UCS2_HEX) == "1"  # 27.007 default dcs 0


def test_cbs_alphabets() -> None:
    assert cbs_alphabet(0x0F) is Alphabet.GSM7
    assert cbs_alphabet(0x48) is Alphabet.UCS2
    assert cbs_alphabet(0x44) is Alphabet.EIGHT_BIT
    assert cbs_alphabet(0x60) is Alphabet.COMPRESSED
    assert cbs_alphabet(0xF4) is Alphabet.EIGHT_BIT and cbs_alphabet(0xF0) is Alphabet.GSM7
    assert cbs_alphabet(0x11) is Alphabet.UCS2 and cbs_alphabet(0x10) is Alphabet.GSM7
    assert cbs_alphabet(0x85) is Alphabet.GSM7  # reserved: assume GSM 7-bit


def test_plain_text_refuses_what_an_at_string_cannot_hold() -> None:
    assert encode_ussd("*123*2#", UssdEncoding.TEXT) == "*123*2#"
    for bad in ('say "hi"', "é", "a\rb"):
        with pytest.raises(TextCodingError):
            encode_ussd(bad, UssdEncoding.TEXT)
    with pytest.raises(TextCodingError):
        encode_ussd("ب", UssdEncoding.GSM7_HEX)


def test_parse_cusd_forms() -> None:
    assert parse_cusd(' 1,"a, "quoted" b",15') == (1, 'a, "quoted" b', 15)
    assert parse_cusd(" 0") == (0, None, None)
    assert parse_cusd('2,"bye"') == (2, "bye", None)
    assert parse_cusd(" 0,plain text, with comma,15") == (0, "plain text, with comma", 15)
    assert parse_cusd(' 0,"x",999') == (0, "x", None)
    assert parse_cusd(" x,1") is None
    assert split_fields('"REC UNREAD","+201",,"24/05/01,10:00:00+08",145') == [
        "REC UNREAD", "+201", "", "24/05/01,10:00:00+08", "145"]


# --- the session -------------------------------------------------------------------------


def feed(session: AtSession, data: bytes, now_s: float = 0.0) -> list[object]:
    return list(session.receive_data(data, now_s))


def test_command_ok_error_and_echo() -> None:
    s = AtSession()
    first = s.command("ATE0", 0.0)
    second = s.command("AT+CMEE=1", 0.0)
    assert s.data_to_send() == b"ATE0\r"  # one command in flight
    assert feed(s, b"ATE0\r\r\nOK\r\n") == [CommandOk(first, "ATE0", ())]
    assert s.data_to_send() == b"AT+CMEE=1\r"
    assert feed(s, b"\r\n+CME ERROR: 30\r\n") == [
        CommandError(second, "AT+CMEE=1", "+CME ERROR: 30", 30)]
    assert CommandError(0, "", "+CMS ERROR: 330", 330).describe().endswith(
        "(SMSC address unknown)")
    assert feed(s, b"\r\nOK\r\n") == [Unsolicited("OK")]  # nobody asked


def test_information_lines_belong_to_their_command_unknown_urcs_do_not() -> None:
    s = AtSession()
    command_id = s.command("AT+CSQ", 0.0)
    events = feed(s, b"\r\n^RSSI: 17\r\n\r\n+CSQ: 17,99\r\n\r\nOK\r\n")
    assert events == [Unsolicited("^RSSI: 17"), CommandOk(command_id, "AT+CSQ", ("+CSQ: 17,99",))]


def test_timeout_moves_on_to_the_next_command() -> None:
    s = AtSession(command_timeout_s=2.0)
    first = s.command("AT", 10.0)
    s.command("AT+CMGF=1", 10.0)
    s.data_to_send()
    assert s.next_deadline_s() == 12.0 and s.tick(11.9) == []
    assert s.tick(12.0) == [CommandTimeout(first, "AT", 2.0)]
    assert s.data_to_send() == b"AT+CMGF=1\r" and s.next_deadline_s() == 14.0


def test_queue_is_bounded() -> None:
    s = AtSession(commands_queued_max=2)
    for _ in range(3):  # one in flight, two waiting
        s.command("AT", 0.0)
    with pytest.raises(OverflowError):
        s.command("AT", 0.0)
    with pytest.raises(ValueError):
        AtSession().command("AT\rATZ", 0.0)


def test_ussd_screens_in_any_order_and_over_several_lines() -> None:
    s = AtSession()
    command_id = s.ussd_send("*123#", 0.0)
    assert s.data_to_send() == b'AT+CUSD=1,"*123#",15\r'
    # Huawei style: the screen before OK; the menu's line breaks inside the string
    events = feed(s, b'\r\n+CUSD: 1,"Extra Balance\r\n1 Borrow\r\n\r\n2 Pay",15\r\n\r\nOK\r\n')
    assert events == [
        UssdResult(UssdStatus.MENU, "Extra Balance\n1 Borrow\n\n2 Pay", 15),
        CommandOk(command_id, 'AT+CUSD=1,"*123#",15', ()),
    ]
    assert feed(s, b"\r\n+CUSD: 2\r\n") == [UssdResult(UssdStatus.TERMINATED, None, None)]
    assert feed(s, b"+CUSD: 4\r\n+CUSD: 5\r\n") == [
        UssdResult(UssdStatus.NOT_SUPPORTED, None, None),
        UssdResult(UssdStatus.TIMED_OUT, None, None)]
    assert feed(s, b"+CUSD: 9,\"x\",15\r\n") == [Unsolicited('+CUSD: 9,"x",15')]


def test_a_never_closed_cusd_string_is_bounded() -> None:
    s = AtSession()
    events = feed(s, b'+CUSD: 1,"open\r\n' + b"line\r\n" * 40 + b'+CUSD: 0,"next",15\r\n')
    assert isinstance(events[0], Discarded)
    assert events[-1] == UssdResult(UssdStatus.DONE, "next", 15)


def test_gsm7_hex_session_sends_and_reads_packed_hex() -> None:
    s = AtSession(UssdEncoding.GSM7_HEX)
    s.ussd_send("*100#", 0.0)
    assert s.data_to_send() == b'AT+CUSD=1,"AA180C3602",15\r'
    screen = pack_ussd("Your balance is 5.00").hex().upper().encode()
    assert feed(s, b'OK\r\n+CUSD: 0,"' + screen + b'",15\r\n')[1] == UssdResult(
        UssdStatus.DONE, "Your balance is 5.00", 15)


def test_stored_sms_is_read_then_deleted() -> None:
    s = AtSession()
    assert feed(s, b'\r\n+CMTI: "SM",3\r\n') == []
    assert s.data_to_send() == b"AT+CMGR=3\r"
    events = feed(
        s,
        b'\r\n+CMGR: "REC UNREAD","1234",,"24/05/01,10:00:00+08",129,4,0,0,"+20100",145,30\r\n'
        b"Extra Balance: 1.00 EGP added.\r\n\r\nYou owe 1.15 EGP.\r\n\r\nOK\r\n",
    )
    assert events[-1] == SmsReceived(
        "1234", "Extra Balance: 1.00 EGP added.\n\nYou owe 1.15 EGP.", "24/05/01,10:00:00+08")
    assert s.data_to_send() == b"AT+CMGD=3\r"


def test_ucs2_sms_and_direct_delivery() -> None:
    s = AtSession()
    feed(s, b'+CMTI: "ME",0\r\n')
    s.data_to_send()
    body = "تم".encode("utf-16-be").hex().upper().encode()
    events = feed(s, b'+CMGR: "REC UNREAD","1234",,"24/05/01,10:00:00+08",129,4,0,8,"+20",145,4'
                     b"\r\n" + body + b"\r\nOK\r\n")
    assert events[-1] == SmsReceived("1234", "تم", "24/05/01,10:00:00+08")
    s.data_to_send()
    assert feed(s, b'OK\r\n+CMT: "+201",,"24/05/01,10:00:01+08",145,4,0,0,"+20",145,5\r\n'
                   b"hello\r\n")[-1] == SmsReceived("+201", "hello", "24/05/01,10:00:01+08")
    u = AtSession(UssdEncoding.UCS2_HEX)  # AT+CSCS="UCS2": the address is hex too
    hex_of = "".join(f"{ord(ch):04X}" for ch in "1234").encode()
    assert feed(u, b'+CMT: "' + hex_of + b'",,"24/05/01",129,4,0,0\r\n' + b"0041\r\n") == [
        SmsReceived("1234", "A", "24/05/01")]


def test_sms_send_waits_for_the_prompt() -> None:
    s = AtSession()
    command_id = s.sms_send("1234", "LOAN 5", 0.0)
    assert s.data_to_send() == b'AT+CMGS="1234"\r'
    assert feed(s, b"\r\n> ") == [] and s.data_to_send() == b"LOAN 5\x1a"
    assert feed(s, b"\r\n+CMGS: 12\r\n\r\nOK\r\n") == [
        CommandOk(command_id, 'AT+CMGS="1234"', ("+CMGS: 12",))]
    s.sms_send("1234", "x", 0.0)
    s.data_to_send()
    assert isinstance(s.tick(100.0)[0], CommandTimeout)
    assert s.data_to_send() == b"\x1b"  # the prompt is abandoned
    with pytest.raises(TextCodingError):
        s.sms_send("1234", "é", 0.0)


def test_over_long_lines_are_dropped_and_the_session_recovers() -> None:
    s = AtSession(line_max_bytes=64)
    assert isinstance(feed(s, b"x" * 100)[0], Discarded)
    assert isinstance(feed(s, b"y" * 100 + b"\r\n")[0], Discarded)
    command_id = s.command("AT", 0.0)
    assert feed(s, b"OK\r\n") == [CommandOk(command_id, "AT", ())]
    assert s.discarded_count == 2


TRANSCRIPT = (
    b'ATE0\r\r\nOK\r\n\r\n+CUSD: 1,"Menu\r\n1 Borrow",15\r\n^RSSI: 3\r\n'
    b'+CMTI: "SM",1\r\n+CMGR: "REC UNREAD","1234",,"t",129,4,0,0,"+2",145,2\r\nhi\r\nOK\r\n'
)


@given(st.lists(st.integers(min_value=1, max_value=len(TRANSCRIPT)), max_size=20))
def test_events_do_not_depend_on_how_reads_are_cut(cuts: list[int]) -> None:
    def run(chunks: list[bytes]) -> list[object]:
        s = AtSession()
        s.command("ATE0", 0.0)
        return [event for chunk in chunks for event in s.receive_data(chunk, 0.0)]

    points = sorted(set(cuts) | {0, len(TRANSCRIPT)})
    chunks = [TRANSCRIPT[a:b] for a, b in itertools.pairwise(points)]
    assert run(chunks) == run([TRANSCRIPT])


LINE_STARTS = [b"+CUSD:", b"+CUSD: 1,\"", b"+CMTI:", b"+CMT:", b"+CMGR:", b"OK", b"+CME ERROR:",
               b"> ", b'"', b",", b"\r\n", b"\x00", b"\xff"]


@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(LINE_STARTS)), max_size=40),
       st.sampled_from(list(UssdEncoding)))
def test_garbage_never_raises(pieces: list[bytes], encoding: UssdEncoding) -> None:
    s = AtSession(encoding, line_max_bytes=256)
    s.command("AT+CMGR=1", 0.0)
    s.sms_send("1234", "hi", 0.0)
    for i, piece in enumerate(pieces):
        s.receive_data(piece, float(i))
        s.tick(float(i))
        s.data_to_send()
