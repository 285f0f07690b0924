"""Frame makers for the fuzzer: valid templates and their mutations, pure and seeded.

No sockets here: each maker takes a `random.Random` and returns bytes plus what the
node should do with them, so the same seed replays the same frames and a failing
frame can be rebuilt from its (seed, index) alone.

Two lanes per stream protocol, because a pipelined connection only stays in step with
its answers while the framing (Diameter header length, SMPP command_length) is sound:

* pipe frames: any damage *inside* the frame, the length field rewritten to the real
  length; the node must answer every request among them on the same connection;
* kill frames: the framing itself is broken (version, length out of bounds, random
  bytes); the node must close that connection (and nothing else).
"""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass

from extrabalance.diameter import codec, gy
from extrabalance.diameter.codec import Message, avp
from extrabalance.diameter.constants import (
    AVP_CC_REQUEST_NUMBER,
    AVP_ORIGIN_HOST,
    AVP_SESSION_ID,
    AVP_SUBSCRIPTION_ID,
    AVP_SUBSCRIPTION_ID_DATA,
    AVP_SUBSCRIPTION_ID_TYPE,
)
from extrabalance.smpp import pdu as smpp
from extrabalance.smpp.ussd import ussd_deliver

# MSISDNs the fuzz templates carry: outside every configured range and without a
# profile, so that even a mutation that stays a valid request cannot move money.
# Many of them, so that requests are not all serialised on one subscriber's lock.
FUZZ_MSISDNS = tuple(f"4470090{i:05d}" for i in range(0, 64_000, 1000)) + ("19995550123",)
DIAMETER_HEADER = struct.Struct(">IIIII")
SMPP_HEADER = struct.Struct(">IIII")
UNKNOWN_AVP_CODE = 0x00FF_FF01  # not in the dictionary
GROUPED_DEPTH_ATTACK = 40  # deeper than the codec's nesting bound

# Result codes an out-of-balance CCR or a malformed request may get (docs/protocols.md).
DIAMETER_ALLOWED_RESULTS = frozenset({
    2001,  # DWA to a mutated DWR, TERMINATION
    3001, 3004, 3007, 3008, 3009,
    3002, 3003,  # a mutated Destination-Host / Destination-Realm (RFC 6733 §6.1)
    4010, 4012,
    5002,  # an UPDATE / TERMINATION of a session never opened
    5001, 5004, 5005, 5009, 5012,  # 5012: CER on an open connection
    5013, 5014, 5015, 5030, 5031,
})


@dataclass(frozen=True, slots=True)
class Frame:
    data: bytes
    mutation: str
    expects_answer: bool  # a request with sound framing: exactly one answer is due


class DiameterFrames:
    """CCR templates as an allowed IN peer would send them, and their mutations."""

    def __init__(self, rng: random.Random, *, origin_host: str, origin_realm: str,
                 destination_realm: str, service_context_id: str, currency_numeric: int,
                 currency_exponent: int = 2) -> None:
        self.rng = rng
        self.origin_host = origin_host
        self.origin_realm = origin_realm
        self.destination_realm = destination_realm
        self.context = service_context_id
        self.currency_numeric = currency_numeric
        self.exponent = currency_exponent
        self._n = 0
        self.templates = [self._template(i) for i in range(24)]
        self._mutations = (
            ("bitflip", 30, self._bitflip),
            ("truncate", 8, self._truncate),
            ("avp_length", 10, self._avp_length),
            ("avp_flags", 10, self._avp_flags),
            ("unknown_m_avp", 6, self._unknown_m_avp),
            ("unknown_avp", 3, self._unknown_avp),
            ("duplicate_avp", 5, self._duplicate_avp),
            ("drop_avp", 5, self._drop_avp),
            ("bad_grouped", 5, self._bad_grouped),
            ("deep_grouped", 2, self._deep_grouped),
            ("huge_avp_length", 3, self._huge_avp_length),
            ("header_fields", 6, self._header_fields),
            ("bad_values", 5, self._bad_values),
            ("random_body", 3, self._random_body),
            ("valid_unrouted", 2, lambda b: b),
        )
        self._weights = [w for _, w, _ in self._mutations]

    # -- templates -------------------------------------------------------------------

    def ccr(self, msisdn: str, *, session_id: str | None = None, request_type: int = 4,
            requested_minor: int | None = None, mscc: bool = False) -> Message:
        self._n += 1
        return gy.build_ccr(gy.CreditControlRequest(
            session_id=session_id or f"{self.origin_host};fuzz;{self._n}",
            origin_host=self.origin_host, origin_realm=self.origin_realm,
            destination_realm=self.destination_realm, request_type=request_type,
            request_number=self._n & 0xFFFF, msisdn=msisdn, service_context_id=self.context,
            requested_minor=requested_minor,
            currency_numeric=self.currency_numeric if requested_minor is not None else None,
            has_mscc=mscc, event_timestamp=gy.ntp_now(),
        ), currency_exponent=self.exponent)

    def _template(self, i: int) -> bytes:
        r = self.rng
        msg = self.ccr(r.choice(FUZZ_MSISDNS), request_type=r.choice((1, 2, 4, 4, 4)),
                       requested_minor=r.choice((None, 500, 1000)), mscc=r.random() < 0.3)
        return codec.encode(msg)

    # -- frames ----------------------------------------------------------------------

    def pipe_frame(self) -> Frame:
        """A frame whose header frames correctly; its inside is damaged."""
        r = self.rng
        name, _, mutate = r.choices(self._mutations, self._weights)[0]
        data = bytearray(mutate(bytearray(r.choice(self.templates))))
        if len(data) < 20:
            data.extend(bytes(20 - len(data)))
        del data[codec.MAX_MESSAGE_BYTES:]
        # Sound framing: version 1, the real length; the ids are set by the sender.
        data[0] = 1
        data[1:4] = len(data).to_bytes(3, "big")
        flags, command = data[4], int.from_bytes(data[5:8], "big")
        if command == 282:  # a DPR would end the connection on purpose: keep it a CCR
            data[5:8] = (272).to_bytes(3, "big")
        return Frame(bytes(data), name, bool(flags & codec.FLAG_REQUEST))

    def kill_frame(self) -> Frame:
        """Framing the node cannot recover from: it must close that connection."""
        r = self.rng
        data = bytearray(r.choice(self.templates))
        kind = r.choice(("version", "length_short", "length_huge", "random_bytes"))
        if kind == "version":
            data[0] = r.choice((0, 2, 0x7F, 0xFF))
        elif kind == "length_short":
            data[1:4] = r.randrange(0, 20).to_bytes(3, "big")
        elif kind == "length_huge":
            data[1:4] = r.randrange(codec.MAX_MESSAGE_BYTES + 1, 1 << 24).to_bytes(3, "big")
        else:
            data = bytearray(r.randbytes(r.randrange(4, 400)))
            data[0] = r.choice([v for v in range(256) if v != 1])
        return Frame(bytes(data), f"kill_{kind}", False)

    # -- mutations (bytearray in, bytearray out) -------------------------------------

    def _bitflip(self, b: bytearray) -> bytearray:
        for _ in range(self.rng.randrange(1, 9)):
            pos = self.rng.randrange(4, len(b))
            if 12 <= pos < 16:  # hop-by-hop id: the sender's to choose
                continue
            b[pos] ^= 1 << self.rng.randrange(8)
        return b

    def _truncate(self, b: bytearray) -> bytearray:
        return b[: self.rng.randrange(20, len(b))]

    def _avp_offsets(self, b: bytes) -> list[int]:
        out, pos = [], 20
        while pos + 8 <= len(b):
            out.append(pos)
            length = int.from_bytes(b[pos + 5:pos + 8], "big")
            if length < 8:
                break
            pos += (length + 3) & ~3
        return out

    def _avp_length(self, b: bytearray) -> bytearray:
        pos = self.rng.choice(self._avp_offsets(b))
        old = int.from_bytes(b[pos + 5:pos + 8], "big")
        new = self.rng.choice((0, 1, 7, 8, old - 1, old + 1, old + 4, old + 1000,
                               self.rng.randrange(1 << 24)))
        b[pos + 5:pos + 8] = (new & 0xFFFFFF).to_bytes(3, "big")
        return b

    def _avp_flags(self, b: bytearray) -> bytearray:
        pos = self.rng.choice(self._avp_offsets(b))
        b[pos + 4] = self.rng.choice((0x80, 0x20, 0x1F, 0xFF, 0xC0, self.rng.randrange(256)))
        return b

    def _insert(self, b: bytearray, extra: bytes) -> bytearray:
        pos = self.rng.choice(self._avp_offsets(b) + [len(b)])
        return b[:pos] + extra + b[pos:]

    def _unknown_m_avp(self, b: bytearray) -> bytearray:
        code = UNKNOWN_AVP_CODE + self.rng.randrange(1000)
        return self._insert(b, codec.encode_avp(avp(code, b"fuzz", flags=0x40)))

    def _unknown_avp(self, b: bytearray) -> bytearray:
        code = UNKNOWN_AVP_CODE + self.rng.randrange(1000)
        return self._insert(b, codec.encode_avp(avp(code, self.rng.randbytes(9), flags=0)))

    def _duplicate_avp(self, b: bytearray) -> bytearray:
        code = self.rng.choice((AVP_SESSION_ID, AVP_ORIGIN_HOST, AVP_CC_REQUEST_NUMBER))
        value = {AVP_SESSION_ID: "dup;1", AVP_ORIGIN_HOST: self.origin_host,
                 AVP_CC_REQUEST_NUMBER: 7}[code]
        return self._insert(b, codec.encode_avp(avp(code, value)))

    def _drop_avp(self, b: bytearray) -> bytearray:
        offsets = self._avp_offsets(b)
        i = self.rng.randrange(len(offsets))
        end = offsets[i + 1] if i + 1 < len(offsets) else len(b)
        return b[:offsets[i]] + b[end:]

    def _bad_grouped(self, b: bytearray) -> bytearray:
        r = self.rng
        choice = r.randrange(3)
        if choice == 0:  # a grouped AVP whose payload is not AVPs
            raw = avp(AVP_SUBSCRIPTION_ID, ())
            data = bytearray(codec.encode_avp(raw)) + r.randbytes(12)
            data[5:8] = len(data).to_bytes(3, "big")
        elif choice == 1:  # a child longer than its parent
            child = bytearray(codec.encode_avp(avp(AVP_SUBSCRIPTION_ID_TYPE, 0)))
            child[5:8] = (200).to_bytes(3, "big")
            data = bytearray(codec.encode_avp(avp(AVP_SUBSCRIPTION_ID, ())))
            data += child
            data[5:8] = len(data).to_bytes(3, "big")
        else:  # wrong child types
            data = bytearray(codec.encode_avp(avp(AVP_SUBSCRIPTION_ID, (
                avp(AVP_SUBSCRIPTION_ID_TYPE, 0),
                avp(AVP_SUBSCRIPTION_ID_DATA, r.choice(("12ab", "", "9" * 40, "٣٤٥")))))))
        return self._insert(b, bytes(data))

    def _deep_grouped(self, b: bytearray) -> bytearray:
        inner = codec.encode_avp(avp(AVP_SUBSCRIPTION_ID_TYPE, 0))
        for _ in range(GROUPED_DEPTH_ATTACK):
            head = struct.pack(">IB", AVP_SUBSCRIPTION_ID, 0x40) + (8 + len(inner)).to_bytes(3, "big")
            inner = head + inner
        return self._insert(b, inner)

    def _huge_avp_length(self, b: bytearray) -> bytearray:
        pos = self.rng.choice(self._avp_offsets(b))
        b[pos + 5:pos + 8] = b"\xff\xff\xff"
        return b

    def _header_fields(self, b: bytearray) -> bytearray:
        r = self.rng
        which = r.randrange(4)
        if which == 0:
            b[4] = r.choice((0xA0, 0x8F, 0x80, 0x90, 0x00, 0xC1, r.randrange(256)))  # flags
        elif which == 1:
            b[5:8] = r.choice((0, 1, 257, 258, 271, 280, 999, 0xFFFFFF)).to_bytes(3, "big")
        elif which == 2:
            b[8:12] = r.choice((0, 1, 3, 5, 16777238, 0xFFFFFFFF)).to_bytes(4, "big")
        else:
            b[16:20] = r.randbytes(4)  # end-to-end id
        return b

    def _bad_values(self, b: bytearray) -> bytearray:
        r = self.rng
        msg = codec.decode(bytes(b))
        avps = list(msg.avps)
        i = r.randrange(len(avps))
        code, flags, vendor, value = avps[i]
        if isinstance(value, int):
            value = r.choice((-1, 0, 9, 2**31, 2**32 - 1))
            try:
                avps[i] = avp(code, value, vendor, flags=flags)
                return bytearray(codec.encode(msg._replace(avps=tuple(avps))))
            except Exception:  # noqa: BLE001 - the type cannot hold it: flip instead
                return self._bitflip(b)
        if isinstance(value, str):
            avps[i] = avp(code, r.choice(("", "\x00", "x" * 3000, "é" * 50)), vendor, flags=flags)
            return bytearray(codec.encode(msg._replace(avps=tuple(avps))))
        return self._bitflip(b)

    def _random_body(self, b: bytearray) -> bytearray:
        return b[:20] + bytearray(self.rng.randbytes(self.rng.randrange(0, 600)))


class SmppFrames:
    """PDUs as an SMSC/USSD gateway would send them to the node (ESME), mutated."""

    def __init__(self, rng: random.Random, *, short_code: str, ussd_code: str) -> None:
        self.rng = rng
        self.short_code = short_code
        templates: list[smpp.Pdu] = []
        for text in ("HELP", "BAL", "LOAN 5", "LOAN", "STOP ADS", "hello", "قرض"):
            for msisdn in FUZZ_MSISDNS:
                templates.append(smpp.DeliverSm(
                    source_addr_ton=1, source_addr_npi=1, source_addr=msisdn,
                    destination_addr=short_code,
                    short_message=text.encode("ascii" if text.isascii() else "utf-16-be"),
                    data_coding=0 if text.isascii() else 8,
                ))
        for msisdn in FUZZ_MSISDNS:
            templates.append(ussd_deliver(msisdn, ussd_code, ussd_code,
                                          session=smpp.ItsSessionInfo(rng.randrange(256), 0)))
            templates.append(ussd_deliver(msisdn, ussd_code, "1", op=smpp.UssdOp.USSR_CONFIRM,
                                          session=smpp.ItsSessionInfo(rng.randrange(256), 1)))
            templates.append(smpp.DataSm(source_addr=msisdn, destination_addr=short_code,
                                         tlvs=((int(smpp.Tag.MESSAGE_PAYLOAD), b"HELP"),)))
            templates.append(smpp.DeliverSm(
                source_addr=msisdn, destination_addr=short_code, esm_class=0x04,
                short_message=b"id:abc123 sub:001 dlvrd:001 stat:DELIVRD err:000 text:x",
                tlvs=((int(smpp.Tag.RECEIPTED_MESSAGE_ID), b"abc123\x00"),
                      (int(smpp.Tag.MESSAGE_STATE), b"\x02"))))
        self.templates = [smpp.encode(p, 1) for p in templates]
        self._mutations = (
            ("bitflip", 30, self._bitflip),
            ("truncate", 10, self._truncate),
            ("tlv_length", 10, self._tlv_length),
            ("random_tlv", 6, self._random_tlv),
            ("no_terminator", 8, self._no_terminator),
            ("sm_length", 8, self._sm_length),
            ("command_id", 8, self._command_id),
            ("command_status", 4, self._command_status),
            ("random_body", 6, self._random_body),
            ("oversized", 2, self._oversized),
            ("valid", 3, lambda b: b),
        )
        self._weights = [w for _, w, _ in self._mutations]

    def valid_sms(self, msisdn: str, text: str) -> bytes:
        return smpp.encode(smpp.DeliverSm(
            source_addr_ton=1, source_addr_npi=1, source_addr=msisdn,
            destination_addr=self.short_code, short_message=text.encode("ascii")), 1)

    def pipe_frame(self) -> Frame:
        r = self.rng
        name, _, mutate = r.choices(self._mutations, self._weights)[0]
        data = bytearray(mutate(bytearray(r.choice(self.templates))))
        if len(data) < 16:
            data.extend(bytes(16 - len(data)))
        data[0:4] = len(data).to_bytes(4, "big")
        command_id = int.from_bytes(data[4:8], "big")
        # unbind ends the bind on purpose, and a bind while bound is the gateway's
        # own protocol error; both are tested elsewhere, not in the stream.
        if command_id in (smpp.CommandId.UNBIND, smpp.CommandId.BIND_RECEIVER,
                          smpp.CommandId.BIND_TRANSMITTER, smpp.CommandId.BIND_TRANSCEIVER):
            data[4:8] = int(smpp.CommandId.DELIVER_SM).to_bytes(4, "big")
            command_id = smpp.CommandId.DELIVER_SM
        answered = not (command_id & 0x8000_0000) and command_id not in (
            smpp.CommandId.OUTBIND, smpp.CommandId.ALERT_NOTIFICATION)
        return Frame(bytes(data), name, answered)

    def kill_frame(self) -> Frame:
        data = bytearray(self.rng.choice(self.templates))
        data[0:4] = self.rng.randrange(0, 16).to_bytes(4, "big")
        return Frame(bytes(data), "kill_command_length", False)

    def _bitflip(self, b: bytearray) -> bytearray:
        for _ in range(self.rng.randrange(1, 9)):
            pos = self.rng.randrange(4, len(b))
            if 12 <= pos < 16:  # sequence number: the sender's to choose
                continue
            b[pos] ^= 1 << self.rng.randrange(8)
        return b

    def _truncate(self, b: bytearray) -> bytearray:
        return b[: self.rng.randrange(16, len(b))]

    def _tlv_start(self, b: bytes) -> int | None:
        try:
            pdu = smpp.decode(bytes(b))
        except smpp.PduDecodeError:
            return None
        tail = sum(4 + len(v) for _, v in pdu.tlvs)
        return len(b) - tail if pdu.tlvs else None

    def _tlv_length(self, b: bytearray) -> bytearray:
        start = self._tlv_start(b)
        if start is None:
            return self._random_tlv(b)
        b[start + 2:start + 4] = self.rng.choice((0, 1, 0xFFFF, 300)).to_bytes(2, "big")
        return b

    def _random_tlv(self, b: bytearray) -> bytearray:
        tag = self.rng.choice((0x0501, 0x1383, 0x0204, 0x0424, 0x001E, 0x0427,
                               self.rng.randrange(0x10000)))
        value = self.rng.randbytes(self.rng.choice((0, 1, 2, 3, 40)))
        return b + struct.pack(">HH", tag, len(value)) + value

    def _no_terminator(self, b: bytearray) -> bytearray:
        # Strip the C-string terminators from the body: fields run into each other.
        return b[:16] + b[16:].replace(b"\x00", b"A", self.rng.randrange(1, 6))

    def _sm_length(self, b: bytearray) -> bytearray:
        # The byte before short_message is sm_length in deliver_sm; find it by decoding.
        try:
            pdu = smpp.decode(bytes(b))
        except smpp.PduDecodeError:
            return self._bitflip(b)
        sm = getattr(pdu, "short_message", None)
        if not sm:
            return self._bitflip(b)
        pos = bytes(b).find(bytes((len(sm),)) + sm)
        if pos < 0:
            return self._bitflip(b)
        b[pos] = self.rng.choice((0, 255, len(sm) + 1, 200))
        return b

    def _command_id(self, b: bytearray) -> bytearray:
        b[4:8] = self.rng.choice((0x00000003, 0x00000004, 0x00000007, 0x00000008, 0x0000000B,
                                  0x00000015, 0x00000021, 0x00000102, 0x00000103, 0x80000005,
                                  0x80000000, 0x12345678, self.rng.randrange(1 << 32)
                                  )).to_bytes(4, "big")
        return b

    def _command_status(self, b: bytearray) -> bytearray:
        b[8:12] = self.rng.randrange(1 << 32).to_bytes(4, "big")
        return b

    def _random_body(self, b: bytearray) -> bytearray:
        return b[:16] + bytearray(self.rng.randbytes(self.rng.randrange(0, 300)))

    def _oversized(self, b: bytearray) -> bytearray:
        return b + bytearray(self.rng.randrange(66_000, 70_000))


def valid_recharge(event_id: str, msisdn: str, amount_minor: int, in_node: str,
                   currency: str = "EGP") -> dict[str, object]:
    return {"event_id": event_id, "msisdn": msisdn, "amount": amount_minor,
            "currency": currency, "balance_after": amount_minor, "in_node": in_node,
            "timestamp": "2026-11-25T10:15:00Z"}


class RechargePayloads:
    """Malformed (and a few accidentally valid) recharge payloads for MQTT."""

    def __init__(self, rng: random.Random, in_node: str) -> None:
        self.rng = rng
        self.in_node = in_node
        self._n = 0

    def payload(self) -> tuple[bytes, str]:
        r = self.rng
        self._n += 1
        base = valid_recharge(f"FUZZ-{self._n}", r.choice(FUZZ_MSISDNS), 500, self.in_node)
        kind = r.choice(("bitflip", "missing", "wrong_type", "extreme", "random", "truncate",
                         "duplicate_key", "nan", "oversized", "not_object", "utf8"))
        text = json.dumps(base)
        if kind == "bitflip":
            raw = bytearray(text.encode())
            for _ in range(r.randrange(1, 6)):
                pos = r.randrange(len(raw))
                raw[pos] ^= 1 << r.randrange(8)
            return bytes(raw), kind
        if kind == "missing":
            del base[r.choice(list(base))]
        elif kind == "wrong_type":
            key = r.choice(list(base))
            base[key] = r.choice((None, [], {}, 1.5, "12", True, -3))
        elif kind == "extreme":
            base[r.choice(("amount", "balance_after"))] = r.choice((-1, 0, 10**30, 2**63))
            if r.random() < 0.5:
                base["msisdn"] = r.choice(("", "12", "+201001234567", "2" * 30, "abc"))
        elif kind == "random":
            return r.randbytes(r.randrange(0, 300)), kind
        elif kind == "truncate":
            return text.encode()[: r.randrange(len(text))], kind
        elif kind == "duplicate_key":
            return (text[:-1] + ', "amount": 1}').encode(), kind
        elif kind == "nan":
            return text.replace("500", r.choice(("NaN", "Infinity", "-Infinity")), 1).encode(), kind
        elif kind == "oversized":
            base["padding"] = "x" * r.randrange(4096, 9000)
        elif kind == "not_object":
            return json.dumps(r.choice(([base], "text", 42, None))).encode(), kind
        elif kind == "utf8":
            return text.encode()[:20] + b"\xff\xfe\xc3" + text.encode()[20:], kind
        return json.dumps(base).encode(), kind
