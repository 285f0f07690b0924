"""SMS / USSD text on SMPP: codings, long-message splitting and reassembly, receipts.

What this file owns (pure functions and one bounded table; no IO, no clocks):
* GSM 03.38 default alphabet + extension table (escape 0x1B), in the UNPACKED form
  SMPP carries with data_coding 0 (one septet per octet: the SMSC packs septets for
  the air interface, the ESME does not), and packed helpers for lengths and for
  gateways that do send packed septets.
* UCS2 (UTF-16BE) for text outside the GSM alphabet (Arabic).
* `choose_coding(text) -> (data_coding, bytes)` and `decode_text(data_coding, octets)`
  for data_coding 0x00, 0x01, 0x02/0x04, 0x03, 0x08, 0x0F and the 0xF0 group.
* `split_text`: long texts as UDH-concatenated parts (IE 0x00, 8-bit reference) or
  one message_payload; `Reassembler`: incoming parts (IE 0x00 8-bit, IE 0x08 16-bit,
  or SAR TLVs) keyed by (source, reference), bounded table, timeouts as inputs.
* `parse_receipt`: the "id:... stat:DELIVRD ..." text of SMSC delivery receipts.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from extrabalance.smpp.pdu import DeliverSm, EsmClass, MessageState, Tag

__all__ = [
    "DC_BINARY",
    "DC_BINARY_4",
    "DC_DEFAULT",
    "DC_IA5",
    "DC_LATIN1",
    "DC_UCS2",
    "DC_USSD_GSM7",
    "GSM7_PART_MAX",
    "GSM7_SINGLE_MAX",
    "UCS2_PART_MAX",
    "UCS2_SINGLE_MAX",
    "ConcatInfo",
    "DeliveryReceipt",
    "Reassembler",
    "SmsSegment",
    "TextCodingError",
    "choose_coding",
    "decode_text",
    "gsm7_decode",
    "gsm7_encode",
    "gsm7_length",
    "is_gsm7",
    "pack_septets",
    "parse_concat",
    "parse_receipt",
    "split_text",
    "ucs2_decode",
    "ucs2_encode",
    "unpack_septets",
]

DC_DEFAULT = 0x00  # SMSC default alphabet: GSM 03.38, unpacked on SMPP
DC_IA5 = 0x01
DC_BINARY = 0x02
DC_LATIN1 = 0x03
DC_BINARY_4 = 0x04
DC_UCS2 = 0x08
DC_USSD_GSM7 = 0x0F  # 3GPP TS 23.038 CBS coding group 0: GSM 7-bit, language unspecified

GSM7_SINGLE_MAX = 160  # septets in one SMS
GSM7_PART_MAX = 153  # septets per part after a 6-octet concatenation UDH (IE 0x00)
UCS2_SINGLE_MAX = 70  # UTF-16 code units in one SMS
UCS2_PART_MAX = 67  # UTF-16 code units per part after a 6-octet UDH
PARTS_MAX = 255  # the concatenation IE counts parts in one octet

ESCAPE = 0x1B


class TextCodingError(ValueError):
    """Text that cannot be put in the requested coding."""


# GSM 03.38 default alphabet, index = septet value. 0x1B is the escape to the
# extension table (shown here as a placeholder never produced by decoding alone).
_GSM7_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)
assert len(_GSM7_BASIC) == 128
_GSM7_EXTENSION = {
    0x0A: "\f", 0x14: "^", 0x28: "{", 0x29: "}", 0x2F: "\\",
    0x3C: "[", 0x3D: "~", 0x3E: "]", 0x40: "|", 0x65: "€",
}

_ENCODE: dict[str, bytes] = {ch: bytes((i,)) for i, ch in enumerate(_GSM7_BASIC) if i != ESCAPE}
_ENCODE.update({ch: bytes((ESCAPE, code)) for code, ch in _GSM7_EXTENSION.items()})
_ENCODE_TABLE = str.maketrans({ch: b.decode("latin-1") for ch, b in _ENCODE.items()})
_GSM_CHARS = frozenset(_ENCODE)
_EXTENSION_CHARS = frozenset(_GSM7_EXTENSION.values())


def is_gsm7(text: str) -> bool:
    """True when every character is in the GSM default alphabet or its extension."""
    return _GSM_CHARS.issuperset(text)


def gsm7_length(text: str) -> int:
    """Septets `text` takes in GSM 7-bit (extension characters take two)."""
    extension = _EXTENSION_CHARS.intersection(text)
    if not extension:
        return len(text)
    return len(text) + sum(text.count(ch) for ch in extension)


def gsm7_encode(text: str) -> bytes:
    """Unpacked septets (one per octet), as SMPP carries them with data_coding 0."""
    if not is_gsm7(text):
        bad = next(ch for ch in text if ch not in _GSM_CHARS)
        raise TextCodingError(f"{bad!r} (U+{ord(bad):04X}) is not in the GSM 7-bit alphabet")
    return text.translate(_ENCODE_TABLE).encode("latin-1")


_DECODE_TABLE = dict(enumerate(_GSM7_BASIC))


def gsm7_decode(septets: bytes) -> str:
    """Unpacked septets to text. An unknown escape code falls back to the basic
    character (3GPP TS 23.038 §6.2.1.1); an octet above 0x7F becomes U+FFFD."""
    if septets.isascii() and ESCAPE not in septets:
        # The common case, without escapes: one table lookup per septet, in C.
        return septets.decode("latin-1").translate(_DECODE_TABLE)
    return _gsm7_decode_each(septets)


def _gsm7_decode_each(septets: bytes) -> str:
    """`gsm7_decode` septet by septet: escapes and octets above 0x7F."""
    out: list[str] = []
    escape = False
    for b in septets:
        if b > 0x7F:
            out.append("\ufffd")
            escape = False
            continue
        if escape:
            out.append(_GSM7_EXTENSION.get(b, _GSM7_BASIC[b] if b != ESCAPE else " "))
            escape = False
        elif b == ESCAPE:
            escape = True
        else:
            out.append(_GSM7_BASIC[b])
    if escape:  # a trailing lone escape: show as space, as handsets do
        out.append(" ")
    return "".join(out)


def pack_septets(septets: bytes, fill_bits: int = 0) -> bytes:
    """Pack 7-bit values into octets, least significant bit first (3GPP TS 23.038
    §6.1.2.1). `fill_bits` zero bits are put first, to align septets after a UDH."""
    acc = 0
    nbits = fill_bits
    out = bytearray()
    for s in septets:
        acc |= (s & 0x7F) << nbits
        nbits += 7
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8
    if nbits:
        out.append(acc & 0xFF)
    return bytes(out)


def unpack_septets(octets: bytes, count: int | None = None, fill_bits: int = 0) -> bytes:
    """Inverse of pack_septets; `count` septets (default: as many as fit)."""
    total_bits = len(octets) * 8 - fill_bits
    n = total_bits // 7 if count is None else min(count, total_bits // 7)
    value = int.from_bytes(octets, "little") >> fill_bits
    return bytes((value >> (7 * i)) & 0x7F for i in range(n))


def ucs2_encode(text: str) -> bytes:
    return text.encode("utf-16-be")


def ucs2_decode(octets: bytes) -> str:
    # An odd trailing octet or a lone surrogate is shown, not raised: the
    # subscriber's text is still worth reading.
    return octets.decode("utf-16-be", errors="replace")


def choose_coding(text: str) -> tuple[int, bytes]:
    """(data_coding, short_message octets): GSM 7-bit unpacked when it fits the
    alphabet, else UCS2."""
    if is_gsm7(text):
        return DC_DEFAULT, text.translate(_ENCODE_TABLE).encode("latin-1")
    return DC_UCS2, text.encode("utf-16-be")


def decode_text(data_coding: int, octets: bytes) -> str:
    """Text of a short_message / message_payload in `data_coding`.

    0x00 and 0x0F (and the 0xF0 group with bit 2 clear) are GSM 7-bit. SMPP carries
    them unpacked; a gateway that sends packed septets gives itself away with an
    octet above 0x7F, and is then unpacked. 0x02/0x04 (8-bit data) are read as
    UTF-8 when valid, else Latin-1, since handset keywords arrive that way too.
    """
    if data_coding in (DC_DEFAULT, DC_USSD_GSM7) or (
        data_coding & 0xF0 == 0xF0 and not data_coding & 0x04
    ):
        if not octets.isascii():  # an octet above 0x7F: packed septets
            septets = unpack_septets(octets)
            if len(octets) % 7 == 0 and septets and septets[-1] == 0:
                septets = septets[:-1]  # 7 fill bits, not an '@' (TS 23.038 §6.1.2.3.1)
            return gsm7_decode(septets)
        return gsm7_decode(octets)
    if data_coding == DC_UCS2:
        return ucs2_decode(octets)
    if data_coding == DC_IA5:
        return octets.decode("ascii", errors="replace")
    if data_coding == DC_LATIN1:
        return octets.decode("latin-1")
    try:
        return octets.decode("utf-8")
    except UnicodeDecodeError:
        return octets.decode("latin-1")


# ---------------------------------------------------------------------------
# splitting


@dataclass(frozen=True, slots=True)
class SmsSegment:
    """One submit_sm worth of text: put `short_message` (or, in payload mode,
    `message_payload` with an empty short_message) with these flags."""

    data_coding: int
    esm_class: int
    short_message: bytes
    message_payload: bytes | None = None


def _chunks(text: str, budget: int, cost: Callable[[str], int]) -> list[str]:
    """Cut `text` so each chunk costs at most `budget`, never splitting an escape
    pair (GSM) or a surrogate pair (UCS2)."""
    parts: list[str] = []
    current: list[str] = []
    used = 0
    for ch in text:
        c = cost(ch)
        if used + c > budget:
            parts.append("".join(current))
            current, used = [], 0
        current.append(ch)
        used += c
    if current:
        parts.append("".join(current))
    return parts


def split_text(
    text: str, reference: int, *, use_message_payload: bool = False
) -> list[SmsSegment]:
    """Split `text` for submit_sm.

    Fits one SMS (160 GSM septets / 70 UCS2 units) -> one segment without UDH.
    Otherwise UDH concatenation with IE 0x00 (8-bit `reference`, 153 septets or 67
    UCS2 units a part), or with `use_message_payload` a single segment carrying the
    whole text in message_payload (the SMSC splits it).
    """
    data_coding, octets = choose_coding(text)
    gsm = data_coding == DC_DEFAULT
    units = len(octets) if gsm else len(octets) // 2
    single_max = GSM7_SINGLE_MAX if gsm else UCS2_SINGLE_MAX
    if units <= single_max:
        return [SmsSegment(data_coding, 0, octets)]
    if use_message_payload:
        return [SmsSegment(data_coding, 0, b"", octets)]
    if gsm:
        chunks = _chunks(text, GSM7_PART_MAX, lambda ch: 2 if ch in _EXTENSION_CHARS else 1)
    else:
        chunks = _chunks(text, UCS2_PART_MAX, lambda ch: 2 if ord(ch) > 0xFFFF else 1)
    if len(chunks) > PARTS_MAX:
        raise TextCodingError(f"text needs {len(chunks)} parts, at most {PARTS_MAX}")
    ref = reference & 0xFF
    total = len(chunks)
    return [
        SmsSegment(
            data_coding, EsmClass.UDHI,
            bytes((5, 0x00, 3, ref, total, i + 1))
            + (gsm7_encode(chunk) if gsm else ucs2_encode(chunk)),
        )
        for i, chunk in enumerate(chunks)
    ]


# ---------------------------------------------------------------------------
# reassembly


_ESM_UDHI = int(EsmClass.UDHI)  # a plain int: `int & IntFlag` runs Python code


@dataclass(frozen=True, slots=True)
class ConcatInfo:
    reference: int
    total: int
    seqnum: int


def parse_concat(
    esm_class: int, short_message: bytes, tlvs: tuple[tuple[int, bytes], ...] = ()
) -> tuple[ConcatInfo | None, bytes]:
    """(concatenation info or None, user data without UDH). Reads UDH IE 0x00
    (8-bit reference) and 0x08 (16-bit reference) when esm_class has UDHI, else the
    SAR TLVs. A malformed UDH is ignored (info None, octets after it returned)."""
    if esm_class & _ESM_UDHI and short_message:
        udhl = short_message[0]
        udh = short_message[1:1 + udhl]
        body = short_message[1 + udhl:]
        info: ConcatInfo | None = None
        i = 0
        while i + 2 <= len(udh):
            iei, iel = udh[i], udh[i + 1]
            ie = udh[i + 2:i + 2 + iel]
            if len(ie) != iel:
                break
            if iei == 0x00 and iel == 3:
                info = ConcatInfo(ie[0], ie[1], ie[2])
            elif iei == 0x08 and iel == 4:
                info = ConcatInfo((ie[0] << 8) | ie[1], ie[2], ie[3])
            i += 2 + iel
        if info is not None and not (1 <= info.seqnum <= info.total):
            info = None
        return info, body
    ref = total = seq = None
    for tag, value in tlvs:
        if tag == Tag.SAR_MSG_REF_NUM and len(value) == 2:
            ref = int.from_bytes(value, "big")
        elif tag == Tag.SAR_TOTAL_SEGMENTS and len(value) == 1:
            total = value[0]
        elif tag == Tag.SAR_SEGMENT_SEQNUM and len(value) == 1:
            seq = value[0]
    if ref is not None and total and seq and 1 <= seq <= total:
        return ConcatInfo(ref, total, seq), short_message
    return None, short_message


@dataclass(slots=True)
class _Pending:
    total: int
    first_seen_s: float
    parts: dict[int, str]


class Reassembler:
    """Joins concatenated parts keyed by (source address, reference).

    Bounded: at most `entries_max` incomplete messages (the oldest is dropped when
    full) and each lives `timeout_s` after its first part (`expire(now_s)`). Parts
    are joined as text, so GSM and UCS2 parts need no octet surgery. A duplicate
    part replaces the earlier copy (SMSC retransmission).
    """

    def __init__(self, *, entries_max: int = 10_000, timeout_s: float = 300.0) -> None:
        self.entries_max = entries_max
        self.timeout_s = timeout_s
        self._pending: OrderedDict[tuple[str, int, int], _Pending] = OrderedDict()
        self.dropped_count = 0

    def __len__(self) -> int:
        return len(self._pending)

    def feed(self, source: str, info: ConcatInfo, text: str, now_s: float) -> str | None:
        """Add one part; the whole text when this part completes it, else None."""
        if info.total == 1:
            return text
        key = (source, info.reference, info.total)
        entry = self._pending.get(key)
        if entry is None:
            while len(self._pending) >= self.entries_max:
                self._pending.popitem(last=False)
                self.dropped_count += 1
            entry = _Pending(info.total, now_s, {})
            self._pending[key] = entry
        entry.parts[info.seqnum] = text
        if len(entry.parts) == entry.total:
            del self._pending[key]
            return "".join(entry.parts[i] for i in range(1, entry.total + 1))
        return None

    def expire(self, now_s: float) -> int:
        """Drop incomplete messages older than timeout_s; returns how many."""
        dropped = 0
        while self._pending:
            key, entry = next(iter(self._pending.items()))
            if now_s - entry.first_seen_s < self.timeout_s:
                break
            del self._pending[key]
            dropped += 1
        self.dropped_count += dropped
        return dropped


# ---------------------------------------------------------------------------
# delivery receipts


@dataclass(frozen=True, slots=True)
class DeliveryReceipt:
    """SMSC delivery receipt text (SMPP 3.4 Appendix B format, de-facto standard)."""

    message_id: str
    submitted: int | None
    delivered: int | None
    submit_date: str | None
    done_date: str | None
    stat: str
    err: str | None
    text: str


_RECEIPT_RE = re.compile(
    r"id:(?P<id>\S*)"
    r"(?:\s+sub:(?P<sub>\d+))?"
    r"(?:\s+dlvrd:(?P<dlvrd>\d+))?"
    r"(?:\s+submit\s+date:(?P<sdate>\d+))?"
    r"(?:\s+done\s+date:(?P<ddate>\d+))?"
    r"\s+stat:(?P<stat>[A-Za-z]+)"
    r"(?:\s+err:(?P<err>\S+))?"
    r"(?:\s+text:(?P<text>.*))?",
    re.IGNORECASE | re.DOTALL,
)


def parse_receipt(text: str) -> DeliveryReceipt | None:
    """Parse a receipt text; None when it is not one."""
    m = _RECEIPT_RE.search(text.strip())
    if m is None:
        return None
    return DeliveryReceipt(
        message_id=m["id"],
        submitted=int(m["sub"]) if m["sub"] else None,
        delivered=int(m["dlvrd"]) if m["dlvrd"] else None,
        submit_date=m["sdate"],
        done_date=m["ddate"],
        stat=m["stat"].upper(),
        err=m["err"],
        text=(m["text"] or "").strip(),
    )


# message_state TLV -> the stat word of the receipt text, for SMSCs that send only TLVs
_STATE_WORDS: dict[int, str] = {
    MessageState.ENROUTE: "ENROUTE", MessageState.DELIVERED: "DELIVRD",
    MessageState.EXPIRED: "EXPIRED", MessageState.DELETED: "DELETED",
    MessageState.UNDELIVERABLE: "UNDELIV", MessageState.ACCEPTED: "ACCEPTD",
    MessageState.UNKNOWN: "UNKNOWN", MessageState.REJECTED: "REJECTD",
}


def receipt_from_deliver(pdu: DeliverSm) -> DeliveryReceipt | None:
    """The receipt a deliver_sm carries (esm_class type 0001), or None.

    The receipted_message_id / message_state TLVs win over the text when present:
    they are the message_id exactly as submit_sm_resp gave it, while some SMSCs
    print the id in the text in another base."""
    if not pdu.is_delivery_receipt:
        return None
    raw = pdu.message_payload if pdu.message_payload is not None else pdu.short_message
    parsed = parse_receipt(decode_text(pdu.data_coding, raw))
    tlv_id = pdu.receipted_message_id
    tlv_state = pdu.message_state
    if parsed is None:
        if tlv_id is None:
            return None
        parsed = DeliveryReceipt(tlv_id, None, None, None, None, "UNKNOWN", None, "")
    if tlv_id is not None or tlv_state is not None:
        parsed = DeliveryReceipt(
            tlv_id if tlv_id is not None else parsed.message_id,
            parsed.submitted, parsed.delivered, parsed.submit_date, parsed.done_date,
            _STATE_WORDS.get(tlv_state, parsed.stat) if tlv_state is not None else parsed.stat,
            parsed.err, parsed.text,
        )
    return parsed
