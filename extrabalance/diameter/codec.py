"""Diameter message codec (RFC 6733 §3, §4): bytes ⇄ ``Message``, sans-IO.

This file owns the wire format and nothing else: the 20-byte header, AVP framing and
padding, the RFC 6733 base data types, the stream framer, and the structural and
grammar checks whose failures the RFC answers with a result code. It knows no
sockets, clocks or peer state. The node and the simulators share it.

Values are plain Python objects, chosen by the AVP's type in ``dictionary``:

=====================  =====================================================
OctetString            ``bytes``
Integer32/64,          ``int``
Unsigned32/64,
Enumerated
Float32/64             ``float``
Grouped                ``tuple[Avp, ...]``
Address                ``ipaddress.IPv4Address | IPv6Address`` or ``RawAddress``
Time                   ``int`` seconds since 1900-01-01 (NTP era folded, see below)
UTF8String,            ``str``
DiameterIdentity,
DiameterURI,
IPFilterRule
unknown AVP            ``bytes``: the payload as received, re-encoded unchanged
=====================  =====================================================

Errors come in two kinds, on purpose:

* ``FrameError``: the byte stream cannot be split into messages (bad version, a
  length that is not a length). The connection is unusable; close it.
* ``DiameterError``: a whole message arrived but is wrong. It carries the RFC's
  ``result_code`` and the ``failed_avps`` to put in Failed-AVP, plus the header
  (``partial``) so the receiver can build the error answer (``error_answer``).

Speed: the hot path is struct over ``bytes`` with one precompiled ``struct.Struct``
per shape, one dictionary lookup per AVP, and ``Avp`` is a tuple (cheap to build).
"""

from __future__ import annotations

import contextlib
import ipaddress
import struct
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, TypeAlias, Union

from . import dictionary as d
from .dictionary import AVP_BY_KEY, AvpDef, AvpType, FlagRule

# Largest message we accept from a peer. A CCR/CCA is well under 2 KiB; a CER with
# many applications under 4 KiB. The bound keeps one peer from making us buffer
# without limit (and 3 length bytes allow up to 16 MiB).
MAX_MESSAGE_BYTES: Final = 65536
HEADER_BYTES: Final = 20
DIAMETER_VERSION: Final = 1
# Nesting bound for Grouped AVPs: protects the recursive decoder from a crafted frame.
MAX_GROUPED_DEPTH: Final = 16

# Header command flags (RFC 6733 §3).
FLAG_REQUEST: Final = 0x80
FLAG_PROXIABLE: Final = 0x40
FLAG_ERROR: Final = 0x20
FLAG_RETRANSMIT: Final = 0x10
_HEADER_RESERVED_BITS: Final = 0x0F

# AVP flags (RFC 6733 §4.1).
AVP_FLAG_VENDOR: Final = 0x80
AVP_FLAG_MANDATORY: Final = 0x40
AVP_FLAG_PROTECTED: Final = 0x20

# Time AVPs: seconds since 1900 on 32 bits. RFC 6733 §4.3.1 (after RFC 5905): a value
# with the top bit clear is in the era that starts 2036-02-07. We fold on decode so
# the value stays a monotonic "seconds since 1900" for 1968..2104.
NTP_UNIX_OFFSET_S: Final = 2_208_988_800
_NTP_ERA_S: Final = 1 << 32


@dataclass(frozen=True, slots=True)
class RawAddress:
    """An Address AVP of a family other than IPv4 (1) or IPv6 (2), kept as is."""

    family: int
    data: bytes


Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address | RawAddress
AvpValue: TypeAlias = Union[int, float, str, bytes, Address, "tuple[Avp, ...]"]


class Avp(NamedTuple):
    """One AVP. A tuple so that building and decoding thousands per second is cheap.

    Build one with ``avp(code, value)`` (flags from the dictionary) rather than by
    hand. For a Grouped AVP ``value`` is the tuple of child AVPs.
    """

    code: int
    flags: int
    vendor_id: int
    value: Any

    @property
    def name(self) -> str:
        return d.avp_name(self.code, self.vendor_id)

    @property
    def is_mandatory(self) -> bool:
        return bool(self.flags & AVP_FLAG_MANDATORY)

    def first(self, code: int, vendor_id: int = 0) -> Avp | None:
        """The first child AVP with this code (Grouped only), or None."""
        return find_first(self.value, code, vendor_id)

    def all(self, code: int, vendor_id: int = 0) -> list[Avp]:
        return find_all(self.value, code, vendor_id)

    def get(self, code: int, default: Any = None, vendor_id: int = 0) -> Any:
        """The value of the first child AVP with this code, or ``default``."""
        return get_value(self.value, code, default, vendor_id)


_new_avp = tuple.__new__
_DEFAULT_FLAGS: Final[dict[int, int]] = {k: e.default_flags for k, e in AVP_BY_KEY.items()}


def avp(code: int, value: Any, vendor_id: int = 0, *, flags: int | None = None) -> Avp:
    """An AVP with the flags the dictionary prescribes (V iff vendor, M per table).

    Lists given as a Grouped value become tuples, so built and decoded messages
    compare equal. ``flags`` overrides the dictionary (tests, odd peers).
    """
    if flags is None:
        flags = _DEFAULT_FLAGS.get(code | (vendor_id << 32))
        if flags is None:
            flags = AVP_FLAG_VENDOR if vendor_id else 0
    if value.__class__ is list:
        value = tuple(value)
    return _new_avp(Avp, (code, flags, vendor_id, value))


def find_first(avps: Iterable[Avp], code: int, vendor_id: int = 0) -> Avp | None:
    for a in avps:
        if a[0] == code and a[2] == vendor_id:
            return a
    return None


def find_all(avps: Iterable[Avp], code: int, vendor_id: int = 0) -> list[Avp]:
    return [a for a in avps if a[0] == code and a[2] == vendor_id]


def get_value(avps: Iterable[Avp], code: int, default: Any = None, vendor_id: int = 0) -> Any:
    for a in avps:
        if a[0] == code and a[2] == vendor_id:
            return a[3]
    return default


PathStep: TypeAlias = int | tuple[int, int]


def find_path(avps: Iterable[Avp], *path: PathStep) -> Avp | None:
    """Follow first matches down Grouped AVPs: ``find_path(m.avps, 437, 413, 445)``.

    A step is a code (vendor 0) or a ``(code, vendor_id)`` pair.
    """
    found: Avp | None = None
    current: Iterable[Avp] = avps
    for step in path:
        if step.__class__ is int:
            for a in current:
                if a[0] == step and not a[2]:
                    found = a
                    break
            else:
                return None
        else:
            code, vendor = step  # type: ignore[misc]
            for a in current:
                if a[0] == code and a[2] == vendor:
                    found = a
                    break
            else:
                return None
        value = found[3]
        current = value if value.__class__ is tuple else ()
    return found


class Message(NamedTuple):
    """One Diameter message. ``version`` is always 1 on the wire.

    Immutable like a frozen dataclass; a NamedTuple because the codec builds one per
    message and tuple construction is several times cheaper.
    """

    command_code: int
    flags: int
    application_id: int
    hop_by_hop_id: int
    end_to_end_id: int
    avps: tuple[Avp, ...]
    version: int = DIAMETER_VERSION

    @property
    def is_request(self) -> bool:
        return bool(self.flags & FLAG_REQUEST)

    @property
    def is_proxiable(self) -> bool:
        return bool(self.flags & FLAG_PROXIABLE)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    @property
    def is_retransmit(self) -> bool:
        return bool(self.flags & FLAG_RETRANSMIT)

    def first(self, code: int, vendor_id: int = 0) -> Avp | None:
        return find_first(self.avps, code, vendor_id)

    def all(self, code: int, vendor_id: int = 0) -> list[Avp]:
        return find_all(self.avps, code, vendor_id)

    def get(self, code: int, default: Any = None, vendor_id: int = 0) -> Any:
        """The value of the first top-level AVP with this code, or ``default``."""
        return get_value(self.avps, code, default, vendor_id)

    def path(self, *path: PathStep) -> Avp | None:
        return find_path(self.avps, *path)

    def path_value(self, *path: PathStep, default: Any = None) -> Any:
        found = find_path(self.avps, *path)
        return default if found is None else found[3]

    @property
    def session_id(self) -> str | None:
        avps = self[5]
        # RFC 6733 §8.8: Session-Id comes first when present; look there first.
        if avps and avps[0][0] == 263 and not avps[0][2]:
            value = avps[0][3]
        else:
            value = get_value(avps, 263)
        return value if value.__class__ is str or isinstance(value, str) else None

    def with_ids(self, hop_by_hop_id: int, end_to_end_id: int | None = None) -> Message:
        return self._replace(
            hop_by_hop_id=hop_by_hop_id,
            end_to_end_id=self.end_to_end_id if end_to_end_id is None else end_to_end_id,
        )

    def with_flags(self, set_flags: int = 0, clear_flags: int = 0) -> Message:
        return self._replace(flags=(self.flags | set_flags) & ~clear_flags & 0xFF)


def request(
    command_code: int,
    application_id: int,
    avps: Sequence[Avp],
    *,
    proxiable: bool = True,
    hop_by_hop_id: int = 0,
    end_to_end_id: int = 0,
) -> Message:
    flags = FLAG_REQUEST | (FLAG_PROXIABLE if proxiable else 0)
    return Message(command_code, flags, application_id, hop_by_hop_id, end_to_end_id,
                   tuple(avps))


def answer(req: Message, avps: Sequence[Avp], *, error: bool = False) -> Message:
    """An answer to ``req``: same command, application and ids; P copied (RFC 6733 §6.2)."""
    flags = (req.flags & FLAG_PROXIABLE) | (FLAG_ERROR if error else 0)
    return Message(req.command_code, flags, req.application_id, req.hop_by_hop_id,
                   req.end_to_end_id, tuple(avps))


# --- errors ---------------------------------------------------------------------------


class FrameError(Exception):
    """The stream cannot be framed any further: close this connection (and only it)."""


class DiameterError(Exception):
    """A message that the RFC answers with ``result_code`` (and Failed-AVP)."""

    def __init__(
        self,
        result_code: int,
        text: str,
        failed_avps: Sequence[Avp] = (),
        partial: Message | None = None,
    ) -> None:
        super().__init__(f"{result_code} {d.RESULT_CODE_NAMES.get(result_code, '')}: {text}")
        self.result_code = result_code
        self.text = text
        self.failed_avps: tuple[Avp, ...] = tuple(failed_avps)
        # Header (and the AVPs decoded before the fault) of the offending message.
        self.partial = partial


def error_answer(
    err: DiameterError,
    origin_host: str,
    origin_realm: str,
    req: Message | None = None,
) -> Message:
    """The answer to a request that failed with ``err``.

    A 3xxx (protocol error) sets the E bit and is the generic answer-message of RFC
    6733 §7.2. Any other code is an answer of the command itself, so it carries its
    grammar's required AVPs (RFC 6733 §7.1): for a CCR, Auth-Application-Id,
    CC-Request-Type and CC-Request-Number (RFC 4006 §3.2), copied from the request
    (a zeroed example where the request lacked it, which its Failed-AVP then names).
    Session-Id echoed when present.
    """
    req = req if req is not None else err.partial
    if req is None:
        raise ValueError("no request header to answer")
    protocol_error = 3000 <= err.result_code < 4000
    avps: list[Avp] = []
    session_id = req.session_id
    if session_id is not None:
        avps.append(avp(263, session_id))
    avps += [avp(264, origin_host), avp(296, origin_realm), avp(268, err.result_code)]
    if not protocol_error:
        avps += _echoed_answer_avps(req)
    if err.text:
        avps.append(avp(281, err.text[:200]))
    if err.failed_avps:
        avps.append(avp(279, err.failed_avps))
    return answer(req, avps, error=protocol_error)


# Required AVPs of an answer that the answer copies from its request (RFC 4006 §3.2:
# CC-Request-Type and CC-Request-Number; Auth-Application-Id is the application's).
_ECHOED_IN_ANSWER: Final = frozenset({258, 415, 416})


def _echoed_answer_avps(req: Message) -> list[Avp]:
    grammar = d.COMMAND_GRAMMAR.get((req.command_code, False))
    if grammar is None:
        return []
    out: list[Avp] = []
    for code, vendor in grammar.required:
        if vendor or code not in _ECHOED_IN_ANSWER:
            continue
        found = req.first(code)
        if code == 258:
            out.append(avp(258, req.application_id))
        elif found is not None and isinstance(found.value, int):
            out.append(avp(code, found.value))
        else:
            out.append(_zero_example(code, 0))
    return out


# --- encoding -------------------------------------------------------------------------

_S_I: Final = struct.Struct(">I")
_S_II: Final = struct.Struct(">II")
_S_III: Final = struct.Struct(">III")
_S_IIII: Final = struct.Struct(">IIII")
_S_IIi: Final = struct.Struct(">IIi")
_S_IIIi: Final = struct.Struct(">IIIi")
_S_IIq: Final = struct.Struct(">IIq")
_S_IIIq: Final = struct.Struct(">IIIq")
_S_IIQ: Final = struct.Struct(">IIQ")
_S_IIIQ: Final = struct.Struct(">IIIQ")
_S_IIf: Final = struct.Struct(">IIf")
_S_IIIf: Final = struct.Struct(">IIIf")
_S_IId: Final = struct.Struct(">IId")
_S_IIId: Final = struct.Struct(">IIId")
_S_HEADER: Final = struct.Struct(">IIIII")
_PAD: Final = (b"", b"\0\0\0", b"\0\0", b"\0")

_Encoder: TypeAlias = Callable[[int, int, int, Any], bytes]


def _fixed_encoder(plain: struct.Struct, vendored: struct.Struct, size: int) -> _Encoder:
    plain_len, vendored_len = 8 + size, 12 + size
    p_pack, v_pack = plain.pack, vendored.pack

    def encode(code: int, flags: int, vendor: int, value: Any) -> bytes:
        if flags & 0x80:
            return v_pack(code, (flags << 24) | vendored_len, vendor, value)
        return p_pack(code, (flags << 24) | plain_len, value)

    return encode


def _encode_octets(code: int, flags: int, vendor: int, data: bytes) -> bytes:
    n = len(data)
    if flags & 0x80:
        return _S_III.pack(code, (flags << 24) | (n + 12), vendor) + data + _PAD[n & 3]
    return _S_II.pack(code, (flags << 24) | (n + 8)) + data + _PAD[n & 3]


def _encode_text(code: int, flags: int, vendor: int, text: str) -> bytes:
    return _encode_octets(code, flags, vendor, text.encode())


def _encode_address(code: int, flags: int, vendor: int, addr: Address) -> bytes:
    if isinstance(addr, ipaddress.IPv4Address):
        payload = b"\x00\x01" + addr.packed
    elif isinstance(addr, ipaddress.IPv6Address):
        payload = b"\x00\x02" + addr.packed
    else:
        payload = addr.family.to_bytes(2, "big") + addr.data
    return _encode_octets(code, flags, vendor, payload)


def _encode_time(code: int, flags: int, vendor: int, ntp_s: int) -> bytes:
    return _ENC_U32(code, flags, vendor, ntp_s & 0xFFFFFFFF)


def _encode_grouped(code: int, flags: int, vendor: int, children: Sequence[Avp]) -> bytes:
    body = b"".join([encode_avp(c) for c in children])
    n = len(body)
    if flags & 0x80:
        return _S_III.pack(code, (flags << 24) | (n + 12), vendor) + body
    return _S_II.pack(code, (flags << 24) | (n + 8)) + body


_ENC_U32: Final = _fixed_encoder(struct.Struct(">III"), _S_IIII, 4)
_ENCODERS: Final[dict[AvpType, _Encoder]] = {
    AvpType.OCTET_STRING: _encode_octets,
    AvpType.INTEGER32: _fixed_encoder(_S_IIi, _S_IIIi, 4),
    AvpType.INTEGER64: _fixed_encoder(_S_IIq, _S_IIIq, 8),
    AvpType.UNSIGNED32: _ENC_U32,
    AvpType.UNSIGNED64: _fixed_encoder(_S_IIQ, _S_IIIQ, 8),
    AvpType.FLOAT32: _fixed_encoder(_S_IIf, _S_IIIf, 4),
    AvpType.FLOAT64: _fixed_encoder(_S_IId, _S_IIId, 8),
    AvpType.GROUPED: _encode_grouped,
    AvpType.ADDRESS: _encode_address,
    AvpType.TIME: _encode_time,
    AvpType.UTF8_STRING: _encode_text,
    AvpType.DIAMETER_IDENTITY: _encode_text,
    AvpType.DIAMETER_URI: _encode_text,
    AvpType.ENUMERATED: _fixed_encoder(_S_IIi, _S_IIIi, 4),
    AvpType.IP_FILTER_RULE: _encode_text,
}
# (code | vendor << 32) -> encoder; unknown AVPs are raw payload bytes.
_ENCODER_BY_KEY: Final[dict[int, _Encoder]] = {
    key: _ENCODERS[entry.type] for key, entry in AVP_BY_KEY.items()
}


def encode_avp(a: Avp) -> bytes:
    code, flags, vendor, value = a
    if vendor and not flags & 0x80:
        # The vendor id travels only when V is set; without it the id would be lost.
        # (V with vendor 0 is encodable: it is what a peer sent, and validate() answers
        # it with 3009.)
        raise ValueError(f"AVP {code}: vendor id {vendor} without the V flag")
    enc = _ENCODER_BY_KEY.get(code | (vendor << 32), _encode_octets)
    try:
        return enc(code, flags, vendor, value)
    except (struct.error, TypeError, AttributeError):
        # A known AVP carried as raw bytes: the content of a Failed-AVP that did not
        # decode, or a test forging a bad value. Send the bytes as they are.
        if isinstance(value, bytes):
            return _encode_octets(code, flags, vendor, value)
        raise ValueError(f"AVP {d.avp_name(code, vendor)}: bad value {value!r}") from None


# Hot-path type tags: the common types are handled inline in the loops below (a
# function call per AVP costs as much as the packing itself); the rest go through
# the per-type functions above.
_TAG_OTHER: Final = 0
_TAG_TEXT: Final = 1
_TAG_U32: Final = 2
_TAG_I32: Final = 3
_TAG_GROUPED: Final = 4
_TAG_I64: Final = 5
_TAG_OCTETS: Final = 6
_TAG_TIME: Final = 7
_TAG_OF_TYPE: Final[dict[AvpType, int]] = {
    AvpType.UTF8_STRING: _TAG_TEXT,
    AvpType.DIAMETER_IDENTITY: _TAG_TEXT,
    AvpType.UNSIGNED32: _TAG_U32,
    AvpType.INTEGER32: _TAG_I32,
    AvpType.ENUMERATED: _TAG_I32,
    AvpType.GROUPED: _TAG_GROUPED,
    AvpType.INTEGER64: _TAG_I64,
    AvpType.OCTET_STRING: _TAG_OCTETS,
    AvpType.TIME: _TAG_TIME,
}
_TAG_BY_KEY: Final[dict[int, int]] = {
    key: _TAG_OF_TYPE.get(entry.type, _TAG_OTHER) for key, entry in AVP_BY_KEY.items()
}
_TAG_BY_KEY[279] = _TAG_OTHER  # Failed-AVP decodes leniently
_P_II: Final = _S_II.pack
_P_III: Final = _S_III.pack
_P_IIII: Final = _S_IIII.pack
_P_IIi: Final = _S_IIi.pack
_P_IIIi: Final = _S_IIIi.pack
_P_IIq: Final = _S_IIq.pack
_P_HEADER: Final = _S_HEADER.pack


# Long-lived AVPs (identities, realms, enumerated values, tier amounts) are built
# once by their owner (gy.py caches them) and sent on every request; ``intern_avp``
# remembers their bytes so encode copies instead of re-packing. Keyed by identity,
# with the object kept alive in the entry so an id cannot be reused under us.
INTERNED_AVPS_MAX: Final = 4096
# id(avp) -> (avp, its bytes, a run of AVPs it starts or None, the run's bytes)
_ENCODED_BY_ID: dict[int, tuple[Avp, bytes, tuple[Avp, ...] | None, bytes]] = {}


def intern_avp(a: Avp) -> Avp:
    """Remember the encoding of an AVP that will be sent many times; returns it."""
    if id(a) not in _ENCODED_BY_ID:
        if len(_ENCODED_BY_ID) >= INTERNED_AVPS_MAX:
            _ENCODED_BY_ID.clear()  # rare; encode then packs those AVPs again
        _ENCODED_BY_ID[id(a)] = (a, encode_avp(a), None, b"")
    return a


def intern_run(avps: tuple[Avp, ...]) -> tuple[Avp, ...]:
    """Remember the encoding of a sequence of AVPs always sent together (a CCR's
    routing AVPs); encode then copies it whole when it meets the same sequence."""
    if avps:
        first = avps[0]
        if len(_ENCODED_BY_ID) >= INTERNED_AVPS_MAX:
            _ENCODED_BY_ID.clear()
        _ENCODED_BY_ID[id(first)] = (first, encode_avp(first), avps,
                                     b"".join(encode_avp(a) for a in avps))
    return avps


def _encode_avps_fast(avps: Sequence[Avp], parts: list[bytes]) -> None:
    append = parts.append
    tags = _TAG_BY_KEY
    interned = _ENCODED_BY_ID
    i = 0
    count = len(avps)
    while i < count:
        a = avps[i]
        i += 1
        hit = interned.get(id(a))
        if hit is not None and hit[0] is a:
            run = hit[2]
            # Tuple equality checks identity first, so a match costs little.
            if run is not None and avps[i - 1 : i - 1 + len(run)] == run:
                append(hit[3])
                i += len(run) - 1
            else:
                append(hit[1])
            continue
        code, flags, vendor, value = a
        if vendor:
            # Vendor AVPs are rare on our paths: the general encoder checks V.
            append(encode_avp(a))
            continue
        tag = tags.get(code, _TAG_OCTETS)
        if flags & 0x80:
            append(encode_avp(a))
        elif tag == _TAG_TEXT:
            data = value.encode()
            n = len(data)
            append(_P_II(code, (flags << 24) | (n + 8)))
            append(data)
            if n & 3:
                append(_PAD[n & 3])
        elif tag == _TAG_U32:
            append(_P_III(code, (flags << 24) | 12, value))
        elif tag == _TAG_I32:
            append(_P_IIi(code, (flags << 24) | 12, value))
        elif tag == _TAG_GROUPED:
            sub: list[bytes] = []
            _encode_avps_fast(value, sub)
            body = b"".join(sub)
            append(_P_II(code, (flags << 24) | (len(body) + 8)))
            append(body)
        elif tag == _TAG_I64:
            append(_P_IIq(code, (flags << 24) | 16, value))
        elif tag == _TAG_TIME:
            append(_P_III(code, (flags << 24) | 12, value & 0xFFFFFFFF))
        elif tag == _TAG_OCTETS and value.__class__ is bytes:
            n = len(value)
            append(_P_II(code, (flags << 24) | (n + 8)))
            append(value)
            if n & 3:
                append(_PAD[n & 3])
        else:
            append(encode_avp(a))


# Message bodies encoded by their builder from a template (gy builds every CCR and
# CCA from pre-encoded static runs plus a few dynamic AVPs, so it has the bytes at
# hand): id(avps tuple) -> (that tuple, its encoding). ``encode`` then copies the
# body and packs only the header, which is what changes between re-sends (ids, T
# flag). The entry holds the tuple itself so its id cannot be reused while the
# entry lives; the table is bounded and simply cleared when full (a miss, e.g. a
# re-send long after the build, only costs the ordinary encoding).
# Small on purpose: a builder's message is encoded right after it is built, and
# entries kept alive longer would be promoted to older GC generations for nothing.
PREENCODED_MAX: Final = 64
_PREENCODED: dict[int, tuple[tuple[Avp, ...], bytes]] = {}


def remember_encoding(avps: tuple[Avp, ...], body: bytes) -> None:
    """Record that the AVP tuple ``avps`` encodes to ``body`` (see _PREENCODED).

    Only for builders whose templates are tested byte for byte against the plain
    encoder (tests/diameter/test_gy.py).
    """
    if len(_PREENCODED) >= PREENCODED_MAX:
        _PREENCODED.clear()
    _PREENCODED[id(avps)] = (avps, body)


def encode_octets_avp(code: int, flags: int, data: bytes) -> bytes:
    """A vendor-less AVP whose payload is ``data`` (OctetString, UTF-8 text, ...)."""
    n = len(data)
    return _P_II(code, (flags << 24) | (n + 8)) + data + _PAD[n & 3]


def encode_grouped_avp(code: int, flags: int, body: bytes) -> bytes:
    """A vendor-less Grouped AVP around its children's encoding ``body``."""
    return _P_II(code, (flags << 24) | (len(body) + 8)) + body


def encode(msg: Message) -> bytes:
    """The wire bytes of ``msg``. Raises ValueError on a value that cannot be encoded."""
    avps = msg[5]
    hit = _PREENCODED.get(id(avps))
    if hit is not None and hit[0] is avps:
        body = hit[1]
    else:
        parts: list[bytes] = []
        try:
            _encode_avps_fast(avps, parts)
        except Exception:  # noqa: BLE001 - redo slowly to raise the precise ValueError
            parts = [encode_avp(a) for a in avps]
        body = b"".join(parts)
    length = HEADER_BYTES + len(body)
    if length > 0xFFFFFF:
        raise ValueError("message longer than 16 MiB")
    return _P_HEADER(
        (msg[6] << 24) | length,
        (msg[1] << 24) | msg[0],
        msg[2],
        msg[3],
        msg[4],
    ) + body


# --- decoding -------------------------------------------------------------------------

_U_I: Final = _S_I.unpack_from
_U_II: Final = _S_II.unpack_from
_U_i: Final = struct.Struct(">i").unpack_from
_U_q: Final = struct.Struct(">q").unpack_from
_U_Q: Final = struct.Struct(">Q").unpack_from
_U_f: Final = struct.Struct(">f").unpack_from
_U_d: Final = struct.Struct(">d").unpack_from
_U_HEADER: Final = _S_HEADER.unpack_from


class _AvpFault(Exception):
    """Internal: an AVP value did not decode; becomes a DiameterError at the top."""

    def __init__(self, result_code: int, text: str, failed: Avp | None) -> None:
        super().__init__(text)
        self.result_code = result_code
        self.text = text
        # None: no AVP header could be read; the enclosing Grouped AVP stands in.
        self.failed = failed


def _length_stand_in(code: int, vendor: int, buf: bytes = b"", start: int = 0, end: int = 0,
                     depth: int = 0) -> Avp:
    """RFC 6733 §7.1.5 (5014): the offending AVP's code with a zero-filled payload of
    the minimum length its type needs, since its own length cannot be trusted: the
    Failed-AVP is then well formed whatever the request's bytes were. A Grouped AVP
    keeps the children that decode whole from buf[start:end] (what it does hold), or
    else the zeroed examples of its required ones."""
    stand_in = _zero_example(code, vendor)
    entry = d.avp_def(code, vendor)
    if entry is None or entry.type is not AvpType.GROUPED or depth >= MAX_GROUPED_DEPTH:
        return stand_in
    whole: list[Avp] = []
    with contextlib.suppress(_AvpFault):
        _decode_avps(buf, start, end, depth + 1, whole)
    return avp(code, tuple(whole), vendor) if whole else stand_in


# A decoder takes (buffer, start, end, depth) and returns the value.
_Decoder: TypeAlias = Callable[[bytes, int, int, int], Any]


def _fixed_decoder(unpack: Callable[[bytes, int], tuple[Any, ...]], size: int) -> _Decoder:
    def decode_fixed(buf: bytes, start: int, end: int, depth: int) -> Any:
        if end - start != size:
            raise ValueError(f"length {end - start}, want {size}")
        return unpack(buf, start)[0]

    return decode_fixed


def _decode_octets(buf: bytes, start: int, end: int, depth: int) -> bytes:
    return buf[start:end]


def _decode_text(buf: bytes, start: int, end: int, depth: int) -> str:
    return buf[start:end].decode()


def _decode_address(buf: bytes, start: int, end: int, depth: int) -> Address:
    if end - start < 2:
        raise ValueError("address too short")
    family = (buf[start] << 8) | buf[start + 1]
    raw = buf[start + 2 : end]
    if family == 1:
        if len(raw) != 4:
            raise ValueError("IPv4 address length")
        return ipaddress.IPv4Address(raw)
    if family == 2:
        if len(raw) != 16:
            raise ValueError("IPv6 address length")
        return ipaddress.IPv6Address(raw)
    return RawAddress(family, raw)


def _decode_time(buf: bytes, start: int, end: int, depth: int) -> int:
    if end - start != 4:
        raise ValueError("Time length")
    value: int = _U_I(buf, start)[0]
    return value if value & 0x80000000 else value + _NTP_ERA_S


def _decode_grouped(buf: bytes, start: int, end: int, depth: int) -> tuple[Avp, ...]:
    if depth >= MAX_GROUPED_DEPTH:
        raise ValueError("grouped AVPs nested too deep")
    return tuple(_decode_avps(buf, start, end, depth + 1, None))


def _decode_failed_avp(buf: bytes, start: int, end: int, depth: int) -> tuple[Avp, ...]:
    # Failed-AVP carries the AVPs some peer could not accept: decode what decodes and
    # keep the rest as bytes, so that an error answer is always readable.
    try:
        return tuple(_decode_avps(buf, start, end, depth + 1, None, lenient=True))
    except _AvpFault:
        raise ValueError("Failed-AVP content does not frame") from None


_DECODERS: Final[dict[AvpType, _Decoder]] = {
    AvpType.OCTET_STRING: _decode_octets,
    AvpType.INTEGER32: _fixed_decoder(_U_i, 4),
    AvpType.INTEGER64: _fixed_decoder(_U_q, 8),
    AvpType.UNSIGNED32: _fixed_decoder(_U_I, 4),
    AvpType.UNSIGNED64: _fixed_decoder(_U_Q, 8),
    AvpType.FLOAT32: _fixed_decoder(_U_f, 4),
    AvpType.FLOAT64: _fixed_decoder(_U_d, 8),
    AvpType.GROUPED: _decode_grouped,
    AvpType.ADDRESS: _decode_address,
    AvpType.TIME: _decode_time,
    AvpType.UTF8_STRING: _decode_text,
    AvpType.DIAMETER_IDENTITY: _decode_text,
    AvpType.DIAMETER_URI: _decode_text,
    AvpType.ENUMERATED: _fixed_decoder(_U_i, 4),
    AvpType.IP_FILTER_RULE: _decode_text,
}
_DECODER_BY_KEY: Final[dict[int, _Decoder]] = {
    key: _DECODERS[entry.type] for key, entry in AVP_BY_KEY.items()
}
_DECODER_BY_KEY[279] = _decode_failed_avp
# Fixed-size types: a wrong length is 5014 INVALID_AVP_LENGTH, not 5004.
_FIXED_SIZE: Final[dict[int, int]] = {
    key: {AvpType.INTEGER32: 4, AvpType.INTEGER64: 8, AvpType.UNSIGNED32: 4,
          AvpType.UNSIGNED64: 8, AvpType.FLOAT32: 4, AvpType.FLOAT64: 8,
          AvpType.TIME: 4, AvpType.ENUMERATED: 4}[entry.type]
    for key, entry in AVP_BY_KEY.items()
    if entry.type in (AvpType.INTEGER32, AvpType.INTEGER64, AvpType.UNSIGNED32,
                      AvpType.UNSIGNED64, AvpType.FLOAT32, AvpType.FLOAT64, AvpType.TIME,
                      AvpType.ENUMERATED)
}


def _decode_avps(
    buf: bytes,
    pos: int,
    end: int,
    depth: int,
    out: list[Avp] | None,
    lenient: bool = False,
) -> list[Avp]:
    """Decode the AVPs in buf[pos:end]. ``out`` (if given) keeps what was decoded
    before a fault, so the error answer can echo the Session-Id."""
    if out is None:
        out = []
    append = out.append
    decoders = _DECODER_BY_KEY
    while pos < end:
        if end - pos < 8:
            raise _AvpFault(5014, "truncated AVP header", None)
        code, word = _U_II(buf, pos)
        flags = word >> 24
        length = word & 0xFFFFFF
        if flags & 0x80:
            if end - pos < 12:
                raise _AvpFault(5014, "truncated vendor AVP header", None)
            vendor = _U_I(buf, pos + 8)[0]
            start = pos + 12
        else:
            vendor = 0
            start = pos + 8
        stop = pos + length
        if stop < start or stop > end:
            raise _AvpFault(5014, f"AVP {d.avp_name(code, vendor)} length {length}",
                            _length_stand_in(code, vendor, buf, start, min(end, stop)
                                             if stop >= start else start, depth))
        key = code | (vendor << 32)
        dec = decoders.get(key)
        if dec is None:
            value: Any = buf[start:stop]
        else:
            try:
                value = dec(buf, start, stop, depth)
            except _AvpFault as fault:
                if not lenient:
                    if fault.failed is None:
                        # A child whose header cannot be read: this Grouped AVP is the
                        # offending one (RFC 6733 §7.5), reported by a stand-in unless
                        # that would be an empty group (then its own container is).
                        stand_in = _length_stand_in(code, vendor, buf, start, stop, depth)
                        if stand_in.value != ():
                            fault.failed = stand_in
                    raise
                value = buf[start:stop]
            except (ValueError, UnicodeDecodeError, struct.error) as exc:
                if lenient:
                    value = buf[start:stop]
                else:
                    size = _FIXED_SIZE.get(key)
                    if size is not None and stop - start != size:
                        raise _AvpFault(5014, f"AVP {d.avp_name(code, vendor)}: {exc}",
                                        _length_stand_in(code, vendor)) from None
                    raise _AvpFault(5004, f"AVP {d.avp_name(code, vendor)}: {exc}",
                                    _new_avp(Avp, (code, flags, vendor, buf[start:stop]))) from None
        append(_new_avp(Avp, (code, flags, vendor, value)))
        pos = stop + (-length & 3)
    if pos > end and not lenient:
        # The last AVP's padding runs past the end of its container.
        raise _AvpFault(5014, "AVP padding beyond its container", out[-1] if out else None)
    return out


_U_III: Final = _S_III.unpack_from

# Decoded AVPs that repeat from message to message (a peer's identity and realm,
# application ids, enumerated values, service units of the few tier amounts) are
# looked up by their exact bytes instead of decoded again. Decoding is a pure
# function of the bytes and every value is immutable, so sharing is safe. Only
# low-cardinality AVPs qualify: never Session-Id, Subscription-Id, timestamps.
DECODE_CACHE_MAX: Final = 4096
DECODE_CACHE_AVP_BYTES_MAX: Final = 128
DECODE_CACHE_RUN_BYTES_MAX: Final = 1024
_CACHED_CODES: Final = frozenset({
    258, 259, 264, 266, 268, 269, 278, 283, 293, 296,  # base: apps, identities, result
    413, 415, 416, 422, 425, 429, 431, 436, 437, 445, 447, 450, 455, 461,  # credit control
})
# raw bytes of an AVP -> (raw bytes of the run it starts, the run's decoded AVPs)
_DECODE_CACHE: dict[bytes, tuple[bytes, tuple[Avp, ...]]] = {}


# code (vendor 0) -> type tag, plus _KIND_CACHED for the codes above: one dictionary
# lookup per AVP tells the fast decoder both how to decode it and whether to cache.
_KIND_CACHED: Final = 8
_KIND_BY_CODE: Final[dict[int, int]] = {
    key: tag | (_KIND_CACHED if key in _CACHED_CODES else 0)
    for key, tag in _TAG_BY_KEY.items() if key <= 0xFFFFFFFF
}


def _decode_avps_fast(
    buf: bytes, pos: int, end: int, depth: int, out: list[Avp]
) -> list[Avp] | None:
    """The strict decoder with the common types inline, for a message's top level.

    Hands over to ``_decode_avps`` at the first AVP it does not handle: a vendor
    AVP, a rare type, or a fault, which the general decoder then reports
    precisely. Kept short on purpose: every bytecode in this loop is paid for
    each AVP of each message.
    """
    append = out.append
    kinds = _KIND_BY_CODE
    new = _new_avp
    cache = _DECODE_CACHE
    unpack = _U_III
    # The current run of consecutive cacheable AVPs (identities, realm, app id, ...):
    # remembered as a whole under its first AVP's bytes, so that the next message
    # with the same run costs one lookup and one comparison.
    run_start = -1
    run_key = b""
    run_index = 0
    try:
        while pos < end:
            code, word, third = unpack(buf, pos)
            size = word & 0xFFFFFF
            stop = pos + size
            if word & 0x80000000 or size < 8 or stop > end:
                break
            kind = kinds.get(code, _TAG_OCTETS)
            raw = None
            if kind & _KIND_CACHED and size <= DECODE_CACHE_AVP_BYTES_MAX:
                raw = buf[pos:stop]
                hit = cache.get(raw)
                if hit is not None:
                    run_bytes, run_avps = hit
                    if len(run_avps) > 1 and buf.startswith(run_bytes, pos) \
                            and pos + len(run_bytes) <= end:
                        if run_start >= 0 and len(out) - run_index >= 2 \
                                and pos - run_start <= DECODE_CACHE_RUN_BYTES_MAX:
                            cache[run_key] = (buf[run_start:pos], tuple(out[run_index:]))
                        out.extend(run_avps)
                        pos += len(run_bytes)
                        run_start = -1
                        continue
                    if run_start < 0:
                        run_start, run_key, run_index = pos, raw, len(out)
                    append(run_avps[0])  # its key is this AVP's exact bytes
                    pos = (stop + 3) & ~3
                    continue
                if run_start < 0:
                    run_start, run_key, run_index = pos, raw, len(out)
            elif run_start >= 0:
                if len(out) - run_index >= 2 and pos - run_start <= DECODE_CACHE_RUN_BYTES_MAX:
                    cache[run_key] = (buf[run_start:pos], tuple(out[run_index:]))
                run_start = -1
            tag = kind & 7
            if tag == _TAG_TEXT:
                value: Any = buf[pos + 8 : stop].decode()
            elif tag == _TAG_GROUPED:
                if depth >= MAX_GROUPED_DEPTH:
                    break
                value = _decode_group_fast(buf, pos + 8, stop, depth + 1)
                if value is None:
                    break
            elif tag == _TAG_TIME:
                if size != 12:
                    break
                value = third if third & 0x80000000 else third + _NTP_ERA_S
            elif tag == _TAG_U32:
                if size != 12:
                    break
                value = third
            elif tag == _TAG_I32:
                if size != 12:
                    break
                value = third - 0x100000000 if third & 0x80000000 else third
            elif tag == _TAG_OCTETS:
                value = buf[pos + 8 : stop]
            elif tag == _TAG_I64:
                if size != 16:
                    break
                value = _U_q(buf, pos + 8)[0]
            else:
                break
            decoded = new(Avp, (code, word >> 24, 0, value))
            append(decoded)
            if raw is not None:
                if len(cache) >= DECODE_CACHE_MAX:
                    cache.clear()
                    run_start = -1  # its first AVP's entry is gone
                cache[raw] = (raw, (decoded,))
            pos = (stop + 3) & ~3
        else:
            if pos == end:
                if run_start >= 0 and len(out) - run_index >= 2 \
                        and pos - run_start <= DECODE_CACHE_RUN_BYTES_MAX:
                    cache[run_key] = (buf[run_start:pos], tuple(out[run_index:]))
                return out
    except (struct.error, UnicodeDecodeError):
        pass  # the general decoder finds and names the fault
    return _decode_avps(buf, pos, end, depth, out)


def _decode_group_fast(buf: bytes, pos: int, end: int, depth: int) -> tuple[Avp, ...] | None:
    """The children of a Grouped AVP, or None at anything the fast path leaves to the
    general decoder. Like the top-level loop without the run bookkeeping: groups
    are short, and the cacheable ones (service units, CC-Money) are cached whole."""
    out: list[Avp] = []
    append = out.append
    kinds = _KIND_BY_CODE
    cache = _DECODE_CACHE
    try:
        while pos < end:
            code, word, third = _U_III(buf, pos)
            size = word & 0xFFFFFF
            stop = pos + size
            if word & 0x80000000 or size < 8 or stop > end:
                return None
            kind = kinds.get(code, _TAG_OCTETS)
            tag = kind & 7
            # Integers decode faster than a cache lookup: without a run to start
            # here, only text and grouped values are worth looking up.
            if tag == _TAG_I32:
                if size != 12:
                    return None
                append(_new_avp(Avp, (code, word >> 24, 0,
                                      third - 0x100000000 if third & 0x80000000 else third)))
                pos = (stop + 3) & ~3
                continue
            if tag == _TAG_U32:
                if size != 12:
                    return None
                append(_new_avp(Avp, (code, word >> 24, 0, third)))
                pos = (stop + 3) & ~3
                continue
            raw = None
            if kind & _KIND_CACHED and size <= DECODE_CACHE_AVP_BYTES_MAX:
                raw = buf[pos:stop]
                hit = cache.get(raw)
                if hit is not None:
                    append(hit[1][0])  # the entry's first AVP is this one
                    pos = (stop + 3) & ~3
                    continue
            if tag == _TAG_TEXT:
                value: Any = buf[pos + 8 : stop].decode()
            elif tag == _TAG_GROUPED:
                if depth >= MAX_GROUPED_DEPTH:
                    return None
                value = _decode_group_fast(buf, pos + 8, stop, depth + 1)
                if value is None:
                    return None
            elif tag == _TAG_I64:
                if size != 16:
                    return None
                value = _U_q(buf, pos + 8)[0]
            elif tag == _TAG_OCTETS:
                value = buf[pos + 8 : stop]
            elif tag == _TAG_TIME:
                if size != 12:
                    return None
                value = third if third & 0x80000000 else third + _NTP_ERA_S
            else:
                return None
            decoded = _new_avp(Avp, (code, word >> 24, 0, value))
            append(decoded)
            if raw is not None:
                if len(cache) >= DECODE_CACHE_MAX:
                    cache.clear()
                cache[raw] = (raw, (decoded,))
            pos = (stop + 3) & ~3
    except (struct.error, UnicodeDecodeError):
        return None
    return tuple(out) if pos == end else None


def decode_header(data: bytes) -> tuple[int, int, int, int, int, int]:
    """(length, flags, command_code, application_id, hop_by_hop_id, end_to_end_id).

    Raises FrameError if the header cannot frame a message.
    """
    if len(data) < HEADER_BYTES:
        raise FrameError(f"need {HEADER_BYTES} header bytes, have {len(data)}")
    vl, fc, app, hbh, e2e = _U_HEADER(data, 0)
    version, length = vl >> 24, vl & 0xFFFFFF
    if version != DIAMETER_VERSION:
        raise FrameError(f"Diameter version {version}")
    if length < HEADER_BYTES:
        raise FrameError(f"message length {length} shorter than the header")
    if length > MAX_MESSAGE_BYTES:
        raise FrameError(f"message length {length} above {MAX_MESSAGE_BYTES}")
    return length, fc >> 24, fc & 0xFFFFFF, app, hbh, e2e


def decode(data: bytes | bytearray | memoryview) -> Message:
    """One complete message from its bytes (exactly one frame).

    Raises FrameError when the header cannot frame the data, DiameterError (5014,
    5004, 5015) when the frame is sound but its content is not.
    """
    buf = data if data.__class__ is bytes else bytes(data)
    if len(buf) < HEADER_BYTES or buf[0] != DIAMETER_VERSION:
        decode_header(buf)  # raises the precise FrameError
    vl, fc, app, hbh, e2e = _U_HEADER(buf, 0)
    length, flags, command = vl & 0xFFFFFF, fc >> 24, fc & 0xFFFFFF
    if length < HEADER_BYTES or length > MAX_MESSAGE_BYTES:
        decode_header(buf)
    if length != len(buf) or length & 3:
        raise DiameterError(
            5015, f"header says {length} bytes, frame has {len(buf)} (must be a multiple of 4)",
            partial=Message(command, flags, app, hbh, e2e, ()))
    out: list[Avp] = []
    try:
        _decode_avps_fast(buf, HEADER_BYTES, length, 0, out)
    except _AvpFault as fault:
        failed = () if fault.failed is None else (fault.failed,)  # no header readable at all
        raise DiameterError(fault.result_code, fault.text, failed,
                            partial=Message(command, flags, app, hbh, e2e, tuple(out))) from None
    return _new_avp(Message, (command, flags, app, hbh, e2e, tuple(out), 1))


# --- framing --------------------------------------------------------------------------


class Framer:
    """Splits a byte stream into whole messages, bounded by ``max_message_bytes``."""

    __slots__ = ("_buffer", "error", "max_message_bytes")

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buffer = bytearray()
        self.max_message_bytes = max_message_bytes
        # Set once a header cannot be a message; the stream is unusable after it.
        self.error: FrameError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return the complete frames it finished, in order.

        A header that cannot be a message raises FrameError, unless whole frames
        came before it in this call: those are returned first (the peer may still
        answer them) and ``error`` is set; every later call raises.
        """
        if self.error is not None:
            raise self.error
        buf = self._buffer
        buf += data
        frames: list[bytes] = []
        pos = 0
        available = len(buf)
        while available - pos >= 4:
            word = _U_I(buf, pos)[0]
            version, length = word >> 24, word & 0xFFFFFF
            if version != DIAMETER_VERSION:
                self.error = FrameError(f"Diameter version {version}")
            elif length < HEADER_BYTES or length > self.max_message_bytes:
                self.error = FrameError(f"message length {length} out of bounds")
            if self.error is not None:
                if frames:
                    return frames
                raise self.error
            if available - pos < length:
                break
            frames.append(bytes(buf[pos : pos + length]))
            pos += length
        if pos:
            del buf[:pos]
        return frames

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)


# --- validation (grammar, flags) ------------------------------------------------------


def _zero_example(code: int, vendor_id: int) -> Avp:
    """RFC 6733 §7.5: a missing AVP is reported with a value "of correct minimum length"
    containing zeroes. Text AVPs get "000" rather than nothing or NULs: analysers
    read an empty value as missing, and a NUL or a single digit as a malformed
    E.164 number in Subscription-Id-Data (Wireshark flags all three)."""
    entry = d.avp_def(code, vendor_id)
    zero: Any = b"\0"
    if entry is not None and entry.type is AvpType.GROUPED:
        # A grouped example carries zeroed examples of its own required AVPs.
        grammar = d.GROUPED_GRAMMAR.get((code, vendor_id))
        zero = tuple(_zero_example(c, v) for c, v in grammar.required) if grammar else ()
    elif entry is not None:
        zero = {
            AvpType.ADDRESS: ipaddress.IPv4Address(0),
            AvpType.UTF8_STRING: "000",
            AvpType.DIAMETER_IDENTITY: "000",
            AvpType.DIAMETER_URI: "000",
            AvpType.IP_FILTER_RULE: "000",
            AvpType.OCTET_STRING: b"\0",
            AvpType.FLOAT32: 0.0,
            AvpType.FLOAT64: 0.0,
        }.get(entry.type, 0)
    return avp(code, zero, vendor_id)


def _check_grammar(avps: Sequence[Avp], grammar: d.Grammar, partial: Message) -> None:
    once = grammar.once_keys
    seen: set[int] = set()
    for a in avps:
        k = a[0] | (a[2] << 32)
        if k in seen:
            if k in once:
                raise DiameterError(5009, f"{d.avp_name(a[0], a[2])} occurs more than once",
                                    (a,), partial)
        else:
            seen.add(k)
    for k in grammar.required_keys:
        if k not in seen:
            code, vendor = k & 0xFFFFFFFF, k >> 32
            raise DiameterError(5005, f"{d.avp_name(code, vendor)} missing",
                                (_zero_example(code, vendor),), partial)


# AVPs found valid, by identity: the decoder hands out the same objects for the AVPs
# that repeat (identities, application ids, service units, see _DECODE_CACHE), and
# whether an AVP is valid depends on nothing but the AVP, so each is checked once.
# Only the cacheable codes are remembered (per-request AVPs would only churn it);
# the entry keeps the AVP alive so that its id stays its own. Cleared when full.
VALIDATED_MAX: Final = 4096
_VALIDATED: dict[int, Avp] = {}


def _check_avps(avps: Sequence[Avp], partial: Message, depth: int) -> None:
    validated = _VALIDATED
    for a in avps:
        if validated.get(id(a)) is a:
            continue
        code, flags, vendor, value = a
        entry: AvpDef | None = AVP_BY_KEY.get(code | (vendor << 32))
        if entry is None:
            if flags & AVP_FLAG_MANDATORY:
                raise DiameterError(5001, f"{d.avp_name(code, vendor)} unsupported with M bit",
                                    (a,), partial)
            continue
        if (flags & AVP_FLAG_VENDOR) and vendor == 0:
            raise DiameterError(3009, f"{entry.name}: V bit with vendor id 0", (a,), partial)
        if entry.m_rule is FlagRule.MUST_NOT and flags & AVP_FLAG_MANDATORY:
            raise DiameterError(3009, f"{entry.name}: M bit where the RFC forbids it",
                                (a,), partial)
        if entry.type is AvpType.GROUPED and code != 279 and isinstance(value, tuple):
            grammar = d.GROUPED_GRAMMAR.get((code, vendor))
            if grammar is not None:
                _check_grammar(value, grammar, partial)
            _check_avps(value, partial, depth + 1)
        if code in _CACHED_CODES and not vendor:
            if len(validated) >= VALIDATED_MAX:
                validated.clear()
            validated[id(a)] = a


# Applications whose commands we know (COMMAND_GRAMMAR) and the base ones.
BASE_COMMANDS: Final = frozenset({257, 280, 282})


def validate(msg: Message, applications: Collection[int] = (4,)) -> None:
    """Raise the DiameterError the RFC prescribes for ``msg``, or return.

    Order: header bits (3008, 5013), command (3001), application (3007), AVP flags
    (3009), unknown M-bit AVPs (5001), grammar (5009 too many, 5005 missing).
    """
    flags = msg.flags
    if flags & _HEADER_RESERVED_BITS:
        raise DiameterError(5013, "reserved header bits set", partial=msg)
    is_request = bool(flags & FLAG_REQUEST)
    if is_request and flags & FLAG_ERROR:
        raise DiameterError(3008, "E bit set on a request", partial=msg)
    grammar = d.COMMAND_GRAMMAR.get((msg.command_code, is_request))
    if grammar is None:
        raise DiameterError(3001, f"command {msg.command_code} unsupported", partial=msg)
    if msg.command_code in BASE_COMMANDS:
        if msg.application_id != 0:
            raise DiameterError(3007, f"base command with application {msg.application_id}",
                                partial=msg)
    elif msg.application_id not in applications:
        raise DiameterError(3007, f"application {msg.application_id} unsupported",
                            partial=msg)
    if grammar.proxiable is not None and bool(flags & FLAG_PROXIABLE) != grammar.proxiable:
        raise DiameterError(3008, "P bit inconsistent with the command", partial=msg)
    _check_avps(msg.avps, msg, 0)
    if not is_request and flags & FLAG_ERROR:
        grammar = d.ERROR_ANSWER_GRAMMAR
    _check_grammar(msg.avps, grammar, msg)


# --- time helpers ---------------------------------------------------------------------


def ntp_from_unix(unix_s: float) -> int:
    """Whole seconds since 1900 (the Time AVP value) from a Unix time."""
    return int(unix_s) + NTP_UNIX_OFFSET_S


def unix_from_ntp(ntp_s: int) -> int:
    return ntp_s - NTP_UNIX_OFFSET_S


def describe(msg: Message) -> str:
    """A readable multi-line dump (logs, tests), driven by the dictionary."""
    kind = d.COMMAND_NAMES.get(msg.command_code, f"Command-{msg.command_code}")
    fl = "".join(c for c, bit in (("R", 0x80), ("P", 0x40), ("E", 0x20), ("T", 0x10))
                 if msg.flags & bit)
    lines = [(f"{kind}-{'Request' if msg.is_request else 'Answer'} [{fl}] app={msg.application_id}"
             f" hbh={msg.hop_by_hop_id:#x} e2e={msg.end_to_end_id:#x}")]

    def walk(avps: Sequence[Avp], indent: str) -> None:
        for a in avps:
            if isinstance(a.value, tuple):
                lines.append(f"{indent}{a.name}:")
                walk(a.value, indent + "  ")
            else:
                lines.append(f"{indent}{a.name}: {a.value!r}")

    walk(msg.avps, "  ")
    return "\n".join(lines)
