"""SMPP 3.4 PDU codec: bytes <-> frozen dataclasses, and a stream framer. Sans-IO.

What this file owns
-------------------
* The one table of command ids (`CommandId`), command statuses (`Status`) and
  optional-parameter tags (`Tag`). Everything else reads these.
* One frozen, slotted dataclass per PDU. Mandatory parameters are fields in the
  order of the SMPP 3.4 specification; `sm_length` is never stored (it is derived
  from `short_message`). Optional parameters (TLVs) are kept RAW in `tlvs`, a tuple
  of `(tag, value_bytes)` pairs in wire order: unknown and vendor tags survive a
  decode/encode round trip byte for byte. Typed accessors (`ussd_service_op`,
  `its_session_info`, ...) read the raw values on demand.
* `encode(pdu) -> bytes`, `decode(frame) -> Pdu` and `Framer` (bounded PDU length).

Errors
------
A frame that cannot be decoded raises `PduDecodeError` carrying the SMPP
`command_status` the session must answer with, and the `sequence_number` and
`command_id` whenever the header was readable, so the session can answer (with the
command's own response, or generic_nack for bad length / unknown command id)
instead of dropping the connection. `PduEncodeError` is raised for a PDU we refuse
to put on the wire (a field too long, an integer out of range).

Speed
-----
submit_sm / deliver_sm are the hot path (every USSD screen, every SMS), so their
mandatory block has a hand-written encoder and decoder (`_encode_sm`, `_decode_sm`);
all other PDUs go through the generic, table-driven `_LAYOUT` path. Tests check that
both paths agree with the layout table and with smpplib byte for byte.
"""

from __future__ import annotations

import enum
import inspect
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol, TypeVar, cast

__all__ = [
    "COMMAND_LENGTH_MAX",
    "DISCARD_LENGTH_MAX",
    "HEADER_LENGTH",
    "INTERFACE_VERSION_34",
    "PDU_CLASSES",
    "RESPONSE_CLASS",
    "SEQUENCE_NUMBER_MAX",
    "SHORT_MESSAGE_LENGTH_MAX",
    "AlertNotification",
    "BindReceiver",
    "BindReceiverResp",
    "BindTransceiver",
    "BindTransceiverResp",
    "BindTransmitter",
    "BindTransmitterResp",
    "CancelSm",
    "CancelSmResp",
    "CommandId",
    "DataSm",
    "DataSmResp",
    "DeliverSm",
    "DeliverSmResp",
    "EnquireLink",
    "EnquireLinkResp",
    "EsmClass",
    "Framer",
    "GenericNack",
    "ItsSessionInfo",
    "MessageState",
    "Outbind",
    "Pdu",
    "PduDecodeError",
    "PduEncodeError",
    "PduError",
    "QuerySm",
    "QuerySmResp",
    "ReplaceSm",
    "ReplaceSmResp",
    "Status",
    "SubmitSm",
    "SubmitSmResp",
    "Tag",
    "TlvValueError",
    "Tlvs",
    "Unbind",
    "UnbindResp",
    "UssdOp",
    "decode",
    "encode",
    "is_response",
    "make_response",
    "status_name",
    "tlv_cstr",
    "tlv_u8",
    "tlv_u16",
    "tlv_u32",
]

HEADER_LENGTH = 16
# A PDU is at most one message_payload TLV (16-bit length) plus the mandatory block
# and a few other TLVs; anything longer is not SMPP 3.4 traffic we must accept.
COMMAND_LENGTH_MAX = 0x10000 + 1024
# An oversized PDU is skipped (answered with generic_nack, bind kept) when it is at
# most this long; beyond it the stream is assumed desynchronised and is closed.
DISCARD_LENGTH_MAX = 1 << 20
SHORT_MESSAGE_LENGTH_MAX = 254
SEQUENCE_NUMBER_MAX = 0x7FFFFFFF
INTERFACE_VERSION_34 = 0x34


class CommandId(enum.IntEnum):
    """SMPP 3.4 command_id values (§5.1.2.1). Bit 31 set = response."""

    GENERIC_NACK = 0x80000000
    BIND_RECEIVER = 0x00000001
    BIND_RECEIVER_RESP = 0x80000001
    BIND_TRANSMITTER = 0x00000002
    BIND_TRANSMITTER_RESP = 0x80000002
    QUERY_SM = 0x00000003
    QUERY_SM_RESP = 0x80000003
    SUBMIT_SM = 0x00000004
    SUBMIT_SM_RESP = 0x80000004
    DELIVER_SM = 0x00000005
    DELIVER_SM_RESP = 0x80000005
    UNBIND = 0x00000006
    UNBIND_RESP = 0x80000006
    REPLACE_SM = 0x00000007
    REPLACE_SM_RESP = 0x80000007
    CANCEL_SM = 0x00000008
    CANCEL_SM_RESP = 0x80000008
    BIND_TRANSCEIVER = 0x00000009
    BIND_TRANSCEIVER_RESP = 0x80000009
    OUTBIND = 0x0000000B
    ENQUIRE_LINK = 0x00000015
    ENQUIRE_LINK_RESP = 0x80000015
    SUBMIT_MULTI = 0x00000021
    SUBMIT_MULTI_RESP = 0x80000021
    ALERT_NOTIFICATION = 0x00000102
    DATA_SM = 0x00000103
    DATA_SM_RESP = 0x80000103


RESPONSE_BIT = 0x80000000


class Status(enum.IntEnum):
    """SMPP 3.4 command_status values (§5.1.3). Vendor values (0x400-0x4FF) stay ints."""

    ESME_ROK = 0x00
    ESME_RINVMSGLEN = 0x01
    ESME_RINVCMDLEN = 0x02
    ESME_RINVCMDID = 0x03
    ESME_RINVBNDSTS = 0x04
    ESME_RALYBND = 0x05
    ESME_RINVPRTFLG = 0x06
    ESME_RINVREGDLVFLG = 0x07
    ESME_RSYSERR = 0x08
    ESME_RINVSRCADR = 0x0A
    ESME_RINVDSTADR = 0x0B
    ESME_RINVMSGID = 0x0C
    ESME_RBINDFAIL = 0x0D
    ESME_RINVPASWD = 0x0E
    ESME_RINVSYSID = 0x0F
    ESME_RCANCELFAIL = 0x11
    ESME_RREPLACEFAIL = 0x13
    ESME_RMSGQFUL = 0x14
    ESME_RINVSERTYP = 0x15
    ESME_RINVNUMDESTS = 0x33
    ESME_RINVDLNAME = 0x34
    ESME_RINVDESTFLAG = 0x40
    ESME_RINVSUBREP = 0x42
    ESME_RINVESMCLASS = 0x43
    ESME_RCNTSUBDL = 0x44
    ESME_RSUBMITFAIL = 0x45
    ESME_RINVSRCTON = 0x48
    ESME_RINVSRCNPI = 0x49
    ESME_RINVDSTTON = 0x50
    ESME_RINVDSTNPI = 0x51
    ESME_RINVSYSTYP = 0x53
    ESME_RINVREPFLAG = 0x54
    ESME_RINVNUMMSGS = 0x55
    ESME_RTHROTTLED = 0x58
    ESME_RINVSCHED = 0x61
    ESME_RINVEXPIRY = 0x62
    ESME_RINVDFTMSGID = 0x63
    ESME_RX_T_APPN = 0x64
    ESME_RX_P_APPN = 0x65
    ESME_RX_R_APPN = 0x66
    ESME_RQUERYFAIL = 0x67
    ESME_RINVOPTPARSTREAM = 0xC0
    ESME_ROPTPARNOTALLWD = 0xC1
    ESME_RINVPARLEN = 0xC2
    ESME_RMISSINGOPTPARAM = 0xC3
    ESME_RINVOPTPARAMVAL = 0xC4
    ESME_RDELIVERYFAILURE = 0xFE
    ESME_RUNKNOWNERR = 0xFF


def status_name(status: int) -> str:
    """`ESME_RTHROTTLED` for 0x58; `0x00000412` for a vendor or unknown value."""
    try:
        return Status(status).name
    except ValueError:
        return f"0x{status:08X}"


class Tag(enum.IntEnum):
    """SMPP 3.4 optional parameter tags (§5.3.2)."""

    DEST_ADDR_SUBUNIT = 0x0005
    DEST_NETWORK_TYPE = 0x0006
    DEST_BEARER_TYPE = 0x0007
    DEST_TELEMATICS_ID = 0x0008
    SOURCE_ADDR_SUBUNIT = 0x000D
    SOURCE_NETWORK_TYPE = 0x000E
    SOURCE_BEARER_TYPE = 0x000F
    SOURCE_TELEMATICS_ID = 0x0010
    QOS_TIME_TO_LIVE = 0x0017
    PAYLOAD_TYPE = 0x0019
    ADDITIONAL_STATUS_INFO_TEXT = 0x001D
    RECEIPTED_MESSAGE_ID = 0x001E
    MS_MSG_WAIT_FACILITIES = 0x0030
    PRIVACY_INDICATOR = 0x0201
    SOURCE_SUBADDRESS = 0x0202
    DEST_SUBADDRESS = 0x0203
    USER_MESSAGE_REFERENCE = 0x0204
    USER_RESPONSE_CODE = 0x0205
    SOURCE_PORT = 0x020A
    DESTINATION_PORT = 0x020B
    SAR_MSG_REF_NUM = 0x020C
    LANGUAGE_INDICATOR = 0x020D
    SAR_TOTAL_SEGMENTS = 0x020E
    SAR_SEGMENT_SEQNUM = 0x020F
    SC_INTERFACE_VERSION = 0x0210
    CALLBACK_NUM_PRES_IND = 0x0302
    CALLBACK_NUM_ATAG = 0x0303
    NUMBER_OF_MESSAGES = 0x0304
    CALLBACK_NUM = 0x0381
    DPF_RESULT = 0x0420
    SET_DPF = 0x0421
    MS_AVAILABILITY_STATUS = 0x0422
    NETWORK_ERROR_CODE = 0x0423
    MESSAGE_PAYLOAD = 0x0424
    DELIVERY_FAILURE_REASON = 0x0425
    MORE_MESSAGES_TO_SEND = 0x0426
    MESSAGE_STATE = 0x0427
    USSD_SERVICE_OP = 0x0501
    DISPLAY_TIME = 0x1201
    SMS_SIGNAL = 0x1203
    MS_VALIDITY = 0x1204
    ALERT_ON_MESSAGE_DELIVERY = 0x130C
    ITS_REPLY_TYPE = 0x1380
    ITS_SESSION_INFO = 0x1383


class UssdOp(enum.IntEnum):
    """Values of the ussd_service_op TLV (SMPP 3.4 §5.3.2.44)."""

    PSSD_INDICATION = 0
    PSSR_INDICATION = 1
    USSR_REQUEST = 2
    USSN_REQUEST = 3
    PSSD_RESPONSE = 16
    PSSR_RESPONSE = 17
    USSR_CONFIRM = 18
    USSN_CONFIRM = 19


class EsmClass(enum.IntFlag):
    """esm_class bits (§5.2.12): mode in bits 1..0, type in bits 5..2, GSM bits 7..6."""

    MODE_DEFAULT = 0x00
    MODE_DATAGRAM = 0x01
    MODE_FORWARD = 0x02
    MODE_STORE_AND_FORWARD = 0x03
    TYPE_DELIVERY_RECEIPT = 0x04
    TYPE_DELIVERY_ACK = 0x08
    TYPE_MANUAL_ACK = 0x10
    TYPE_CONVERSATION_ABORT = 0x18
    TYPE_INTERMEDIATE_NOTIFICATION = 0x20
    UDHI = 0x40
    REPLY_PATH = 0x80


ESM_CLASS_TYPE_MASK = 0x3C
# Plain ints of the bits read on every PDU: `int & IntFlag member` runs the enum's
# Python-level operator, `int & int` does not.
_ESM_UDHI = int(EsmClass.UDHI)
_ESM_TYPE_DELIVERY_RECEIPT = int(EsmClass.TYPE_DELIVERY_RECEIPT)


class MessageState(enum.IntEnum):
    """message_state values (§5.2.28)."""

    ENROUTE = 1
    DELIVERED = 2
    EXPIRED = 3
    DELETED = 4
    UNDELIVERABLE = 5
    ACCEPTED = 6
    UNKNOWN = 7
    REJECTED = 8


# ---------------------------------------------------------------------------
# errors


class PduError(Exception):
    """Base of the codec's errors."""


class PduDecodeError(PduError):
    """A frame we cannot decode; `status` is what to answer with.

    `sequence_number` and `command_id` are None when the header itself was
    unreadable. `fatal` means the byte stream cannot be resynchronised (the
    connection must be closed after answering).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        sequence_number: int | None = None,
        command_id: int | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(f"{status_name(status)}: {message}")
        self.status = status
        self.sequence_number = sequence_number
        self.command_id = command_id
        self.fatal = fatal

    @property
    def answer_with_generic_nack(self) -> bool:
        """SMPP 3.4 §4.3: generic_nack answers a bad command_length or unknown command_id."""
        return (
            self.status in (Status.ESME_RINVCMDLEN, Status.ESME_RINVCMDID)
            or self.command_id is None
            or self.command_id not in RESPONSE_CLASS
        )


class PduEncodeError(PduError, ValueError):
    """A PDU we refuse to encode (field too long, integer out of range)."""


class TlvValueError(PduError, ValueError):
    """A TLV present but with a value of the wrong size or content."""

    def __init__(self, tag: int, message: str, status: int = Status.ESME_RINVPARLEN) -> None:
        super().__init__(f"TLV 0x{tag:04X}: {message}")
        self.tag = tag
        self.status = status


# ---------------------------------------------------------------------------
# TLV helpers and typed accessors

Tlvs = tuple[tuple[int, bytes], ...]


# The tag goes in as a plain int (a `Tag` member is equal but not `int` itself): a PDU
# whose TLVs are plain (int, bytes) pairs passes the fast check at construction.

def tlv_u8(tag: int, value: int) -> tuple[int, bytes]:
    return (int(tag), value.to_bytes(1, "big"))


def tlv_u16(tag: int, value: int) -> tuple[int, bytes]:
    return (int(tag), value.to_bytes(2, "big"))


def tlv_u32(tag: int, value: int) -> tuple[int, bytes]:
    return (int(tag), value.to_bytes(4, "big"))


def tlv_cstr(tag: int, value: str) -> tuple[int, bytes]:
    return (int(tag), value.encode("latin-1") + b"\0")


@dataclass(frozen=True, slots=True)
class ItsSessionInfo:
    """its_session_info (0x1383), 2 octets: octet 0 = session number; octet 1 bits 7..1
    = sequence number of the dialogue step, bit 0 = end of session (1 = the
    session ends with this message)."""

    session_number: int
    sequence_number: int = 0
    end_of_session: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.session_number <= 0xFF:
            raise ValueError(f"session_number {self.session_number} outside 0..255")
        if not 0 <= self.sequence_number <= 0x7F:
            raise ValueError(f"sequence_number {self.sequence_number} outside 0..127")

    def to_bytes(self) -> bytes:
        return bytes((self.session_number, (self.sequence_number << 1) | self.end_of_session))

    @classmethod
    def from_bytes(cls, value: bytes) -> ItsSessionInfo:
        if len(value) != 2:
            raise TlvValueError(Tag.ITS_SESSION_INFO, f"length {len(value)}, expected 2")
        # Two octets are in range by construction: no __init__ (read on every USSD step).
        info: ItsSessionInfo = object.__new__(cls)
        _set_session_number(info, value[0])
        _set_step(info, value[1] >> 1)
        _set_end_of_session(info, bool(value[1] & 1))
        return info

    def as_tlv(self) -> tuple[int, bytes]:
        return (_TAG_ITS_SESSION_INFO, self.to_bytes())


_TAG_ITS_SESSION_INFO = int(Tag.ITS_SESSION_INFO)
_set_session_number = inspect.getattr_static(ItsSessionInfo, "session_number").__set__
_set_step = inspect.getattr_static(ItsSessionInfo, "sequence_number").__set__
_set_end_of_session = inspect.getattr_static(ItsSessionInfo, "end_of_session").__set__


def _tlv_int(tlvs: Tlvs, tag: int, size: int) -> int | None:
    for t, v in tlvs:
        if t == tag:
            if len(v) != size:
                raise TlvValueError(tag, f"length {len(v)}, expected {size}")
            return int.from_bytes(v, "big")
    return None


def _tlv_raw(tlvs: Tlvs, tag: int) -> bytes | None:
    for t, v in tlvs:
        if t == tag:
            return v
    return None


def _tlv_cstr(tlvs: Tlvs, tag: int) -> str | None:
    v = _tlv_raw(tlvs, tag)
    if v is None:
        return None
    # Some SMSCs omit the terminating NUL on receipted_message_id; accept both.
    if v.endswith(b"\0"):
        v = v[:-1]
    if b"\0" in v:
        raise TlvValueError(tag, "NUL inside C-octet string", Status.ESME_RINVOPTPARAMVAL)
    return v.decode("latin-1")


class _TlvAccess:
    """Typed read access to the raw TLVs of a PDU (mixin; no state of its own)."""

    __slots__ = ()
    tlvs: Tlvs

    def tlv(self, tag: int) -> bytes | None:
        """Raw value of the first TLV with this tag, or None."""
        return _tlv_raw(self.tlvs, tag)

    @property
    def ussd_service_op(self) -> int | None:
        return _tlv_int(self.tlvs, Tag.USSD_SERVICE_OP, 1)

    @property
    def its_session_info(self) -> ItsSessionInfo | None:
        v = _tlv_raw(self.tlvs, Tag.ITS_SESSION_INFO)
        return None if v is None else ItsSessionInfo.from_bytes(v)

    @property
    def user_message_reference(self) -> int | None:
        return _tlv_int(self.tlvs, Tag.USER_MESSAGE_REFERENCE, 2)

    @property
    def message_payload(self) -> bytes | None:
        return _tlv_raw(self.tlvs, Tag.MESSAGE_PAYLOAD)

    @property
    def sar_msg_ref_num(self) -> int | None:
        return _tlv_int(self.tlvs, Tag.SAR_MSG_REF_NUM, 2)

    @property
    def sar_total_segments(self) -> int | None:
        return _tlv_int(self.tlvs, Tag.SAR_TOTAL_SEGMENTS, 1)

    @property
    def sar_segment_seqnum(self) -> int | None:
        return _tlv_int(self.tlvs, Tag.SAR_SEGMENT_SEQNUM, 1)

    @property
    def receipted_message_id(self) -> str | None:
        return _tlv_cstr(self.tlvs, Tag.RECEIPTED_MESSAGE_ID)

    @property
    def message_state(self) -> int | None:
        return _tlv_int(self.tlvs, Tag.MESSAGE_STATE, 1)

    @property
    def network_error_code(self) -> bytes | None:
        v = _tlv_raw(self.tlvs, Tag.NETWORK_ERROR_CODE)
        if v is not None and len(v) != 3:
            raise TlvValueError(Tag.NETWORK_ERROR_CODE, f"length {len(v)}, expected 3")
        return v

    @property
    def source_port(self) -> int | None:
        return _tlv_int(self.tlvs, Tag.SOURCE_PORT, 2)

    @property
    def destination_port(self) -> int | None:
        return _tlv_int(self.tlvs, Tag.DESTINATION_PORT, 2)

    @property
    def sc_interface_version(self) -> int | None:
        return _tlv_int(self.tlvs, Tag.SC_INTERFACE_VERSION, 1)

    @property
    def ms_availability_status(self) -> int | None:
        return _tlv_int(self.tlvs, Tag.MS_AVAILABILITY_STATUS, 1)

    @property
    def more_messages_to_send(self) -> int | None:
        return _tlv_int(self.tlvs, Tag.MORE_MESSAGES_TO_SEND, 1)


# ---------------------------------------------------------------------------
# PDU dataclasses. Every PDU has `command_status` and `sequence_number` (the header)
# and `tlvs`; `command_id` is a class constant.

_NO_TLVS: Tlvs = ()


@dataclass(frozen=True, slots=True)
class _Header(_TlvAccess):
    command_id: ClassVar[int]
    tlvs: Tlvs = _NO_TLVS
    command_status: int = 0
    sequence_number: int = 0

    def __post_init__(self) -> None:
        # A PDU object is encodable by construction: lengths, octet ranges and TLVs
        # are checked here, once, so `encode` needs no checks on the hot path. The
        # decoder builds objects without __init__ (see _builder): what it decodes
        # satisfies these rules by construction.
        _validate(self)


@dataclass(frozen=True, slots=True)
class _Bind(_Header):
    system_id: str = ""
    password: str = ""
    system_type: str = ""
    interface_version: int = INTERFACE_VERSION_34
    addr_ton: int = 0
    addr_npi: int = 0
    address_range: str = ""


@dataclass(frozen=True, slots=True)
class BindTransmitter(_Bind):
    command_id: ClassVar[int] = CommandId.BIND_TRANSMITTER


@dataclass(frozen=True, slots=True)
class BindReceiver(_Bind):
    command_id: ClassVar[int] = CommandId.BIND_RECEIVER


@dataclass(frozen=True, slots=True)
class BindTransceiver(_Bind):
    command_id: ClassVar[int] = CommandId.BIND_TRANSCEIVER


@dataclass(frozen=True, slots=True)
class _BindResp(_Header):
    system_id: str = ""


@dataclass(frozen=True, slots=True)
class BindTransmitterResp(_BindResp):
    command_id: ClassVar[int] = CommandId.BIND_TRANSMITTER_RESP


@dataclass(frozen=True, slots=True)
class BindReceiverResp(_BindResp):
    command_id: ClassVar[int] = CommandId.BIND_RECEIVER_RESP


@dataclass(frozen=True, slots=True)
class BindTransceiverResp(_BindResp):
    command_id: ClassVar[int] = CommandId.BIND_TRANSCEIVER_RESP


@dataclass(frozen=True, slots=True)
class Outbind(_Header):
    command_id: ClassVar[int] = CommandId.OUTBIND
    system_id: str = ""
    password: str = ""


@dataclass(frozen=True, slots=True)
class Unbind(_Header):
    command_id: ClassVar[int] = CommandId.UNBIND


@dataclass(frozen=True, slots=True)
class UnbindResp(_Header):
    command_id: ClassVar[int] = CommandId.UNBIND_RESP


@dataclass(frozen=True, slots=True)
class EnquireLink(_Header):
    command_id: ClassVar[int] = CommandId.ENQUIRE_LINK


@dataclass(frozen=True, slots=True)
class EnquireLinkResp(_Header):
    command_id: ClassVar[int] = CommandId.ENQUIRE_LINK_RESP


@dataclass(frozen=True, slots=True)
class GenericNack(_Header):
    command_id: ClassVar[int] = CommandId.GENERIC_NACK


@dataclass(frozen=True, slots=True)
class _Sm(_Header):
    """Mandatory block shared by submit_sm and deliver_sm (§4.4.1, §4.6.1)."""

    service_type: str = ""
    source_addr_ton: int = 0
    source_addr_npi: int = 0
    source_addr: str = ""
    dest_addr_ton: int = 0
    dest_addr_npi: int = 0
    destination_addr: str = ""
    esm_class: int = 0
    protocol_id: int = 0
    priority_flag: int = 0
    schedule_delivery_time: str = ""
    validity_period: str = ""
    registered_delivery: int = 0
    replace_if_present_flag: int = 0
    data_coding: int = 0
    sm_default_msg_id: int = 0
    short_message: bytes = b""

    @property
    def is_delivery_receipt(self) -> bool:
        return (self.esm_class & ESM_CLASS_TYPE_MASK) == _ESM_TYPE_DELIVERY_RECEIPT

    @property
    def has_udh(self) -> bool:
        return bool(self.esm_class & _ESM_UDHI)


@dataclass(frozen=True, slots=True)
class SubmitSm(_Sm):
    command_id: ClassVar[int] = CommandId.SUBMIT_SM


@dataclass(frozen=True, slots=True)
class DeliverSm(_Sm):
    command_id: ClassVar[int] = CommandId.DELIVER_SM


@dataclass(frozen=True, slots=True)
class _MessageIdResp(_Header):
    message_id: str = ""


@dataclass(frozen=True, slots=True)
class SubmitSmResp(_MessageIdResp):
    command_id: ClassVar[int] = CommandId.SUBMIT_SM_RESP


@dataclass(frozen=True, slots=True)
class DeliverSmResp(_MessageIdResp):
    command_id: ClassVar[int] = CommandId.DELIVER_SM_RESP


@dataclass(frozen=True, slots=True)
class DataSmResp(_MessageIdResp):
    command_id: ClassVar[int] = CommandId.DATA_SM_RESP


@dataclass(frozen=True, slots=True)
class DataSm(_Header):
    command_id: ClassVar[int] = CommandId.DATA_SM
    service_type: str = ""
    source_addr_ton: int = 0
    source_addr_npi: int = 0
    source_addr: str = ""
    dest_addr_ton: int = 0
    dest_addr_npi: int = 0
    destination_addr: str = ""
    esm_class: int = 0
    registered_delivery: int = 0
    data_coding: int = 0


@dataclass(frozen=True, slots=True)
class QuerySm(_Header):
    command_id: ClassVar[int] = CommandId.QUERY_SM
    message_id: str = ""
    source_addr_ton: int = 0
    source_addr_npi: int = 0
    source_addr: str = ""


@dataclass(frozen=True, slots=True)
class QuerySmResp(_Header):
    command_id: ClassVar[int] = CommandId.QUERY_SM_RESP
    message_id: str = ""
    final_date: str = ""
    message_state: int = 0  # mandatory here, a TLV elsewhere
    error_code: int = 0


@dataclass(frozen=True, slots=True)
class CancelSm(_Header):
    command_id: ClassVar[int] = CommandId.CANCEL_SM
    service_type: str = ""
    message_id: str = ""
    source_addr_ton: int = 0
    source_addr_npi: int = 0
    source_addr: str = ""
    dest_addr_ton: int = 0
    dest_addr_npi: int = 0
    destination_addr: str = ""


@dataclass(frozen=True, slots=True)
class CancelSmResp(_Header):
    command_id: ClassVar[int] = CommandId.CANCEL_SM_RESP


@dataclass(frozen=True, slots=True)
class ReplaceSm(_Header):
    command_id: ClassVar[int] = CommandId.REPLACE_SM
    message_id: str = ""
    source_addr_ton: int = 0
    source_addr_npi: int = 0
    source_addr: str = ""
    schedule_delivery_time: str = ""
    validity_period: str = ""
    registered_delivery: int = 0
    sm_default_msg_id: int = 0
    short_message: bytes = b""


@dataclass(frozen=True, slots=True)
class ReplaceSmResp(_Header):
    command_id: ClassVar[int] = CommandId.REPLACE_SM_RESP


@dataclass(frozen=True, slots=True)
class AlertNotification(_Header):
    command_id: ClassVar[int] = CommandId.ALERT_NOTIFICATION
    source_addr_ton: int = 0
    source_addr_npi: int = 0
    source_addr: str = ""
    esme_addr_ton: int = 0
    esme_addr_npi: int = 0
    esme_addr: str = ""


Pdu = (
    BindTransmitter | BindReceiver | BindTransceiver
    | BindTransmitterResp | BindReceiverResp | BindTransceiverResp
    | Outbind | Unbind | UnbindResp | EnquireLink | EnquireLinkResp | GenericNack
    | SubmitSm | SubmitSmResp | DeliverSm | DeliverSmResp | DataSm | DataSmResp
    | QuerySm | QuerySmResp | CancelSm | CancelSmResp | ReplaceSm | ReplaceSmResp
    | AlertNotification
)

# ---------------------------------------------------------------------------
# The layout table: mandatory parameters of each PDU in spec order.
# kind: "c" C-octet string (max octets INCLUDING the NUL), "u8" one octet,
#       "sm" sm_length octet followed by that many octets of short_message.
# The status is what a decoder answers when that field is malformed.

_C, _U8, _SMBODY = "c", "u8", "sm"
_S = Status
_Field = tuple[str, str, int, int]

_BIND_LAYOUT: tuple[_Field, ...] = (
    ("system_id", _C, 16, _S.ESME_RINVSYSID),
    ("password", _C, 9, _S.ESME_RINVPASWD),
    ("system_type", _C, 13, _S.ESME_RINVSYSTYP),
    ("interface_version", _U8, 1, _S.ESME_RUNKNOWNERR),
    ("addr_ton", _U8, 1, _S.ESME_RINVSRCTON),
    ("addr_npi", _U8, 1, _S.ESME_RINVSRCNPI),
    ("address_range", _C, 41, _S.ESME_RINVPARLEN),
)
_BIND_RESP_LAYOUT: tuple[_Field, ...] = (("system_id", _C, 16, _S.ESME_RINVSYSID),)
_SM_LAYOUT: tuple[_Field, ...] = (
    ("service_type", _C, 6, _S.ESME_RINVSERTYP),
    ("source_addr_ton", _U8, 1, _S.ESME_RINVSRCTON),
    ("source_addr_npi", _U8, 1, _S.ESME_RINVSRCNPI),
    ("source_addr", _C, 21, _S.ESME_RINVSRCADR),
    ("dest_addr_ton", _U8, 1, _S.ESME_RINVDSTTON),
    ("dest_addr_npi", _U8, 1, _S.ESME_RINVDSTNPI),
    ("destination_addr", _C, 21, _S.ESME_RINVDSTADR),
    ("esm_class", _U8, 1, _S.ESME_RINVESMCLASS),
    ("protocol_id", _U8, 1, _S.ESME_RUNKNOWNERR),
    ("priority_flag", _U8, 1, _S.ESME_RINVPRTFLG),
    ("schedule_delivery_time", _C, 17, _S.ESME_RINVSCHED),
    ("validity_period", _C, 17, _S.ESME_RINVEXPIRY),
    ("registered_delivery", _U8, 1, _S.ESME_RINVREGDLVFLG),
    ("replace_if_present_flag", _U8, 1, _S.ESME_RINVREPFLAG),
    ("data_coding", _U8, 1, _S.ESME_RUNKNOWNERR),
    ("sm_default_msg_id", _U8, 1, _S.ESME_RINVDFTMSGID),
    ("short_message", _SMBODY, SHORT_MESSAGE_LENGTH_MAX, _S.ESME_RINVMSGLEN),
)
_MSGID_RESP_LAYOUT: tuple[_Field, ...] = (("message_id", _C, 65, _S.ESME_RINVMSGID),)

_LAYOUT: dict[type[_Header], tuple[_Field, ...]] = {
    BindTransmitter: _BIND_LAYOUT,
    BindReceiver: _BIND_LAYOUT,
    BindTransceiver: _BIND_LAYOUT,
    BindTransmitterResp: _BIND_RESP_LAYOUT,
    BindReceiverResp: _BIND_RESP_LAYOUT,
    BindTransceiverResp: _BIND_RESP_LAYOUT,
    Outbind: (
        ("system_id", _C, 16, _S.ESME_RINVSYSID),
        ("password", _C, 9, _S.ESME_RINVPASWD),
    ),
    Unbind: (),
    UnbindResp: (),
    EnquireLink: (),
    EnquireLinkResp: (),
    GenericNack: (),
    SubmitSm: _SM_LAYOUT,
    DeliverSm: _SM_LAYOUT,
    SubmitSmResp: _MSGID_RESP_LAYOUT,
    DeliverSmResp: _MSGID_RESP_LAYOUT,
    DataSmResp: _MSGID_RESP_LAYOUT,
    DataSm: (
        ("service_type", _C, 6, _S.ESME_RINVSERTYP),
        ("source_addr_ton", _U8, 1, _S.ESME_RINVSRCTON),
        ("source_addr_npi", _U8, 1, _S.ESME_RINVSRCNPI),
        ("source_addr", _C, 65, _S.ESME_RINVSRCADR),
        ("dest_addr_ton", _U8, 1, _S.ESME_RINVDSTTON),
        ("dest_addr_npi", _U8, 1, _S.ESME_RINVDSTNPI),
        ("destination_addr", _C, 65, _S.ESME_RINVDSTADR),
        ("esm_class", _U8, 1, _S.ESME_RINVESMCLASS),
        ("registered_delivery", _U8, 1, _S.ESME_RINVREGDLVFLG),
        ("data_coding", _U8, 1, _S.ESME_RUNKNOWNERR),
    ),
    QuerySm: (
        ("message_id", _C, 65, _S.ESME_RINVMSGID),
        ("source_addr_ton", _U8, 1, _S.ESME_RINVSRCTON),
        ("source_addr_npi", _U8, 1, _S.ESME_RINVSRCNPI),
        ("source_addr", _C, 21, _S.ESME_RINVSRCADR),
    ),
    QuerySmResp: (
        ("message_id", _C, 65, _S.ESME_RINVMSGID),
        ("final_date", _C, 17, _S.ESME_RINVPARLEN),
        ("message_state", _U8, 1, _S.ESME_RUNKNOWNERR),
        ("error_code", _U8, 1, _S.ESME_RUNKNOWNERR),
    ),
    CancelSm: (
        ("service_type", _C, 6, _S.ESME_RINVSERTYP),
        ("message_id", _C, 65, _S.ESME_RINVMSGID),
        ("source_addr_ton", _U8, 1, _S.ESME_RINVSRCTON),
        ("source_addr_npi", _U8, 1, _S.ESME_RINVSRCNPI),
        ("source_addr", _C, 21, _S.ESME_RINVSRCADR),
        ("dest_addr_ton", _U8, 1, _S.ESME_RINVDSTTON),
        ("dest_addr_npi", _U8, 1, _S.ESME_RINVDSTNPI),
        ("destination_addr", _C, 21, _S.ESME_RINVDSTADR),
    ),
    CancelSmResp: (),
    ReplaceSm: (
        ("message_id", _C, 65, _S.ESME_RINVMSGID),
        ("source_addr_ton", _U8, 1, _S.ESME_RINVSRCTON),
        ("source_addr_npi", _U8, 1, _S.ESME_RINVSRCNPI),
        ("source_addr", _C, 21, _S.ESME_RINVSRCADR),
        ("schedule_delivery_time", _C, 17, _S.ESME_RINVSCHED),
        ("validity_period", _C, 17, _S.ESME_RINVEXPIRY),
        ("registered_delivery", _U8, 1, _S.ESME_RINVREGDLVFLG),
        ("sm_default_msg_id", _U8, 1, _S.ESME_RINVDFTMSGID),
        ("short_message", _SMBODY, SHORT_MESSAGE_LENGTH_MAX, _S.ESME_RINVMSGLEN),
    ),
    ReplaceSmResp: (),
    AlertNotification: (
        ("source_addr_ton", _U8, 1, _S.ESME_RINVSRCTON),
        ("source_addr_npi", _U8, 1, _S.ESME_RINVSRCNPI),
        ("source_addr", _C, 65, _S.ESME_RINVSRCADR),
        ("esme_addr_ton", _U8, 1, _S.ESME_RINVDSTTON),
        ("esme_addr_npi", _U8, 1, _S.ESME_RINVDSTNPI),
        ("esme_addr", _C, 65, _S.ESME_RINVDSTADR),
    ),
}

PDU_CLASSES: dict[int, type[_Header]] = {cls.command_id: cls for cls in _LAYOUT}

# request command_id -> its response class (generic_nack, outbind and
# alert_notification have no response of their own).
RESPONSE_CLASS: dict[int, type] = {
    CommandId.BIND_TRANSMITTER: BindTransmitterResp,
    CommandId.BIND_RECEIVER: BindReceiverResp,
    CommandId.BIND_TRANSCEIVER: BindTransceiverResp,
    CommandId.UNBIND: UnbindResp,
    CommandId.ENQUIRE_LINK: EnquireLinkResp,
    CommandId.SUBMIT_SM: SubmitSmResp,
    CommandId.DELIVER_SM: DeliverSmResp,
    CommandId.DATA_SM: DataSmResp,
    CommandId.QUERY_SM: QuerySmResp,
    CommandId.CANCEL_SM: CancelSmResp,
    CommandId.REPLACE_SM: ReplaceSmResp,
}


def is_response(command_id: int) -> bool:
    return bool(command_id & RESPONSE_BIT)


def make_response(request: Pdu, status: int = 0, **fields: object) -> Pdu:
    """The response to `request` with its sequence number; generic_nack when the
    request has no response of its own. Built as `cls(...)` would build it (the same
    check), without the frozen dataclass's __init__: one per request received."""
    cls = RESPONSE_CLASS.get(request.command_id, GenericNack)
    values = list(_DEFAULTS[cls])
    values[1] = status
    values[2] = request.sequence_number
    if fields:
        index = _FIELD_INDEX[cls]
        for name, value in fields.items():
            i = index.get(name)
            if i is None:
                raise TypeError(f"{cls.__name__} has no field {name!r}")
            values[i] = value
    resp = _build(cls, values)
    _validate(resp)
    return resp


# ---------------------------------------------------------------------------
# encoding

_pack_header = struct.Struct(">IIII").pack
_pack_tlv_head = struct.Struct(">HH").pack
_unpack_header = struct.Struct(">IIII").unpack_from
_unpack_tlv_head = struct.Struct(">HH").unpack_from


def _validate(p: _Header) -> None:
    """Raise PduEncodeError unless `p` can go on the wire as it is."""
    if not _fits(p):
        _validate_slowly(p)


# (C-string fields as (name, size), octet fields, octet-string fields as (name, size))
# of each PDU class, for the fast check below.
_Plan = tuple[tuple[tuple[str, int], ...], tuple[str, ...], tuple[tuple[str, int], ...]]
_PLANS: dict[type, _Plan] = {}


def _plan(cls: type) -> _Plan:
    layout = _LAYOUT[cls]
    plan = (tuple((n, size) for n, kind, size, _ in layout if kind == _C),
            tuple(n for n, kind, _, _ in layout if kind == _U8),
            tuple((n, size) for n, kind, size, _ in layout if kind != _C and kind != _U8))
    _PLANS[cls] = plan
    return plan


def _fits(p: _Header) -> bool:
    """True when `p` is plainly encodable as it is: plain ints in range, ASCII strings
    short enough, bytes, TLVs as (int, bytes) pairs. Anything else (an enum member to
    normalise, latin-1 text, a bytearray, an error to name) is left to the slow check,
    which has the final word. Every PDU the node builds passes here."""
    if not _header_fits(p.command_status, p.sequence_number, p.tlvs):
        return False
    cls = type(p)
    strings, octets, blobs = _PLANS.get(cls) or _plan(cls)
    for field_name, size in strings:
        v = getattr(p, field_name)
        if not (type(v) is str and len(v) < size and v.isascii() and "\0" not in v):
            return False
    for field_name in octets:
        v = getattr(p, field_name)
        if not (type(v) is int and 0 <= v <= 0xFF):
            return False
    for field_name, size in blobs:
        v = getattr(p, field_name)
        if not (type(v) is bytes and len(v) <= size):
            return False
    return True


def _header_fits(status: object, seq: object, tlvs: object) -> bool:
    """The fast check of what every PDU has: header integers and (int, bytes) TLVs."""
    if not (type(status) is int and 0 <= status <= 0xFFFFFFFF
            and type(seq) is int and 0 <= seq <= 0xFFFFFFFF
            and type(tlvs) is tuple):
        return False
    for pair in tlvs:
        if not (type(pair) is tuple and len(pair) == 2):
            return False
        tag, value = pair
        if not (type(tag) is int and 0 <= tag <= 0xFFFF
                and type(value) is bytes and len(value) <= 0xFFFF):
            return False
    return True


def _validate_slowly(p: _Header) -> None:
    """The full check: names what is wrong, and normalises what can be (enum members
    to ints, bytearray and memoryview to bytes, TLV lists to tuples)."""
    name = type(p).__name__
    for attr in ("command_status", "sequence_number"):
        v = getattr(p, attr)
        if not isinstance(v, int) or not 0 <= v <= 0xFFFFFFFF:
            raise PduEncodeError(f"{name}.{attr}: {v!r} is not a 32-bit unsigned integer")
        if type(v) is not int:  # enum members become plain ints: equal, hashable, short repr
            object.__setattr__(p, attr, int(v))
    tlvs = p.tlvs
    if type(tlvs) is not tuple or (
        tlvs and not all(type(t) is tuple and type(t[0]) is int for t in tlvs)
    ):
        try:
            tlvs = tuple((int(t), bytes(v)) for t, v in tlvs)
        except (TypeError, ValueError) as exc:
            raise PduEncodeError(f"{name}.tlvs: not (tag, bytes) pairs: {tlvs!r}") from exc
        object.__setattr__(p, "tlvs", tlvs)
    for pair in tlvs:
        if len(pair) != 2:
            raise PduEncodeError(f"{name}.tlvs: not a (tag, bytes) pair: {pair!r}")
        tag, value = pair
        if not 0 <= tag <= 0xFFFF:
            raise PduEncodeError(f"{name}.tlvs: tag {tag!r} is not 16-bit")
        if not isinstance(value, bytes) or len(value) > 0xFFFF:
            raise PduEncodeError(f"{name}.tlvs: value of 0x{tag:04X} is not bytes <= 65535")
    for field_name, kind, size, _status in _LAYOUT[type(p)]:
        v = getattr(p, field_name)
        if kind == _C:
            if not isinstance(v, str):
                raise PduEncodeError(f"{name}.{field_name}: {v!r} is not a str")
            try:
                raw = v.encode("latin-1")
            except UnicodeEncodeError as exc:
                raise PduEncodeError(f"{name}.{field_name}: not latin-1: {v!r}") from exc
            if len(raw) >= size or "\0" in v:
                raise PduEncodeError(
                    f"{name}.{field_name}: {len(raw)} octets, at most {size - 1} allowed"
                )
        elif kind == _U8:
            if not isinstance(v, int) or not 0 <= v <= 0xFF:
                raise PduEncodeError(f"{name}.{field_name}: {v!r} is not an octet")
            if type(v) is not int:
                object.__setattr__(p, field_name, int(v))
        else:
            if isinstance(v, (bytearray, memoryview)):
                v = bytes(v)
                object.__setattr__(p, field_name, v)
            if not isinstance(v, bytes) or len(v) > size:
                raise PduEncodeError(f"{name}.{field_name}: not bytes of at most {size} octets")


def _encode_tlvs(tlvs: Tlvs) -> bytes:
    if not tlvs:
        return b""
    parts = []
    try:
        for tag, value in tlvs:
            parts.append(_pack_tlv_head(tag, len(value)))
            parts.append(value)
        return b"".join(parts)
    except (struct.error, TypeError) as exc:
        raise PduEncodeError(f"bad TLV in {tlvs!r}: {exc}") from exc


def _encode_sm(p: _Sm) -> bytes:
    """Hand-written encoder of the submit_sm / deliver_sm mandatory block (hot path).
    No checks: __post_init__ validated the object."""
    sm = p.short_message
    return b"%b\0%c%c%b\0%c%c%b\0%c%c%c%b\0%b\0%c%c%c%c%c%b" % (
        p.service_type.encode("latin-1"), p.source_addr_ton, p.source_addr_npi,
        p.source_addr.encode("latin-1"), p.dest_addr_ton, p.dest_addr_npi,
        p.destination_addr.encode("latin-1"), p.esm_class, p.protocol_id, p.priority_flag,
        p.schedule_delivery_time.encode("latin-1"), p.validity_period.encode("latin-1"),
        p.registered_delivery, p.replace_if_present_flag, p.data_coding,
        p.sm_default_msg_id, len(sm), sm,
    )


def _encode_generic(p: object, layout: tuple[_Field, ...]) -> bytes:
    parts: list[bytes] = []
    for name, kind, _size, _status in layout:
        value = getattr(p, name)
        if kind == _C:
            parts.append(value.encode("latin-1"))
            parts.append(b"\0")
        elif kind == _U8:
            parts.append(bytes((value,)))
        else:
            parts.append(bytes((len(value),)))
            parts.append(value)
    return b"".join(parts)


def encode(pdu: Pdu, sequence_number: int | None = None) -> bytes:
    """The wire form of `pdu`; `sequence_number` overrides the PDU's own (the session
    numbers outbound requests without copying the dataclass)."""
    cls = type(pdu)
    try:
        if cls is SubmitSm or cls is DeliverSm:
            body = _encode_sm(pdu)  # type: ignore[arg-type]
        else:
            body = _encode_generic(pdu, _LAYOUT[cls])
        tlvs = pdu.tlvs
        if tlvs:
            body += _encode_tlvs(tlvs)
        seq = pdu.sequence_number if sequence_number is None else sequence_number
        return _pack_header(len(body) + 16, pdu.command_id, pdu.command_status, seq) + body
    except (ValueError, OverflowError, TypeError, AttributeError, struct.error) as exc:
        if isinstance(exc, PduEncodeError):
            raise
        raise PduEncodeError(f"{cls.__name__}: {exc}") from exc
    except KeyError as exc:
        raise PduEncodeError(f"not a PDU: {pdu!r}") from exc


# ---------------------------------------------------------------------------
# decoding


def _decode_tlvs(data: bytes, i: int, end: int, seq: int, cid: int) -> Tlvs:
    tlvs = []
    while i < end:
        if i + 4 > end:
            raise PduDecodeError(
                Status.ESME_RINVOPTPARSTREAM, f"{end - i} stray octets after the TLVs",
                sequence_number=seq, command_id=cid,
            )
        tag, length = _unpack_tlv_head(data, i)
        i += 4
        if i + length > end:
            raise PduDecodeError(
                Status.ESME_RINVOPTPARSTREAM,
                f"TLV 0x{tag:04X} length {length} runs past the PDU",
                sequence_number=seq, command_id=cid,
            )
        tlvs.append((tag, data[i:i + length]))
        i += length
    return tuple(tlvs)


def _short(seq: int, cid: int, name: str) -> PduDecodeError:
    return PduDecodeError(
        Status.ESME_RINVCMDLEN, f"PDU ends inside {name}", sequence_number=seq, command_id=cid
    )


# The decoder builds PDU objects without running __init__/__post_init__ (whose
# checks are redundant for decoded values and cost half the decode time): it
# allocates the object and fills each slot through the slot's own descriptor.

_new_object = object.__new__


def _slot_setters(cls: type) -> tuple[Callable[[object, object], None], ...]:
    names = [f.name for f in fields(cls)]
    return tuple(inspect.getattr_static(cls, n).__set__ for n in names)


def _check_layout_matches_fields() -> None:
    """The layout table and the dataclass fields must list the same names in the
    same order (after tlvs, command_status, sequence_number)."""
    for cls, layout in _LAYOUT.items():
        names = [f.name for f in fields(cls)]
        expected = ["tlvs", "command_status", "sequence_number"] + [f[0] for f in layout]
        if names != expected:
            raise AssertionError(f"{cls.__name__}: fields {names} != layout {expected}")


_check_layout_matches_fields()
_SETTERS: dict[type, tuple[Callable[[object, object], None], ...]] = {
    cls: _slot_setters(cls) for cls in _LAYOUT
}
_SEQ_SETTER = inspect.getattr_static(_Header, "sequence_number").__set__


def _build(cls: type, values: list[object]) -> Pdu:
    obj: Pdu = _new_object(cls)
    for setter, value in zip(_SETTERS[cls], values):
        setter(obj, value)
    pdu: Pdu = obj
    return pdu


_FIELD_NAMES: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in _LAYOUT
}
# Every field has a default; positions as in _SETTERS.
_DEFAULTS: dict[type, tuple[object, ...]] = {
    cls: tuple(f.default for f in fields(cls)) for cls in _LAYOUT
}
_FIELD_INDEX: dict[type, dict[str, int]] = {
    cls: {name: i for i, name in enumerate(names)} for cls, names in _FIELD_NAMES.items()
}


def with_sequence_number(pdu: Pdu, sequence_number: int) -> Pdu:
    """A copy of `pdu` with another sequence number, without re-validating (the
    original was valid): sessions number every outbound request this way."""
    if pdu.sequence_number == sequence_number:
        return pdu
    if not 0 <= sequence_number <= 0xFFFFFFFF:
        raise PduEncodeError(f"sequence_number {sequence_number} is not 32-bit")
    cls = type(pdu)
    obj: Pdu = _new_object(cls)
    for setter, name in zip(_SETTERS[cls], _FIELD_NAMES[cls]):
        setter(obj, getattr(pdu, name))
    _SEQ_SETTER(obj, sequence_number)
    return obj


_SmT = TypeVar("_SmT", bound=_Sm)


class _SmBuilder(Protocol):
    def __call__(self, cls: type[_SmT], **fields: Any) -> _SmT: ...


def _make_sm_builder() -> _SmBuilder:
    # The setters below go in the dataclass's field order; say so, or fail at import.
    assert _FIELD_NAMES[SubmitSm] == _FIELD_NAMES[DeliverSm] == (
        "tlvs", "command_status", "sequence_number", "service_type", "source_addr_ton",
        "source_addr_npi", "source_addr", "dest_addr_ton", "dest_addr_npi",
        "destination_addr", "esm_class", "protocol_id", "priority_flag",
        "schedule_delivery_time", "validity_period", "registered_delivery",
        "replace_if_present_flag", "data_coding", "sm_default_msg_id", "short_message")
    (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16, s17,
     s18, s19) = _SETTERS[SubmitSm]
    new = _new_object
    validate = _validate
    header_fits = _header_fits
    only_int, only_str = {int}, {str}
    sm_max = SHORT_MESSAGE_LENGTH_MAX
    # The lengths checked below are the layout's: say so, or fail at import.
    assert [(n, size) for n, kind, size, _ in _SM_LAYOUT if kind != _U8] == [
        ("service_type", 6), ("source_addr", 21), ("destination_addr", 21),
        ("schedule_delivery_time", 17), ("validity_period", 17),
        ("short_message", SHORT_MESSAGE_LENGTH_MAX)]

    def build_sm(
        cls: type[_SmT], *, service_type: str = "", source_addr_ton: int = 0,
        source_addr_npi: int = 0, source_addr: str = "", dest_addr_ton: int = 0,
        dest_addr_npi: int = 0, destination_addr: str = "", esm_class: int = 0,
        protocol_id: int = 0, priority_flag: int = 0, schedule_delivery_time: str = "",
        validity_period: str = "", registered_delivery: int = 0,
        replace_if_present_flag: int = 0, data_coding: int = 0, sm_default_msg_id: int = 0,
        short_message: bytes = b"", tlvs: Tlvs = _NO_TLVS, command_status: int = 0,
        sequence_number: int = 0,
    ) -> _SmT:
        """`cls(...)` for submit_sm / deliver_sm with the same check, without the
        frozen dataclass's __init__ (a setattr through object per field: most of the
        cost of building a USSD screen)."""
        o: _SmT = new(cls)
        s0(o, tlvs)
        s1(o, command_status)
        s2(o, sequence_number)
        s3(o, service_type)
        s4(o, source_addr_ton)
        s5(o, source_addr_npi)
        s6(o, source_addr)
        s7(o, dest_addr_ton)
        s8(o, dest_addr_npi)
        s9(o, destination_addr)
        s10(o, esm_class)
        s11(o, protocol_id)
        s12(o, priority_flag)
        s13(o, schedule_delivery_time)
        s14(o, validity_period)
        s15(o, registered_delivery)
        s16(o, replace_if_present_flag)
        s17(o, data_coding)
        s18(o, sm_default_msg_id)
        s19(o, short_message)
        # The fast check on the arguments themselves (what _fits reads back through
        # the slots); anything unusual gets the full check, which has the final word.
        octets = (source_addr_ton, source_addr_npi, dest_addr_ton, dest_addr_npi, esm_class,
                  protocol_id, priority_flag, registered_delivery, replace_if_present_flag,
                  data_coding, sm_default_msg_id)
        strings = (service_type, source_addr, destination_addr, schedule_delivery_time,
                   validity_period)
        if not (set(map(type, octets)) == only_int and 0 <= min(octets)
                and max(octets) <= 0xFF and set(map(type, strings)) == only_str
                and len(service_type) < 6 and len(source_addr) < 21
                and len(destination_addr) < 21 and len(schedule_delivery_time) < 17
                and len(validity_period) < 17 and type(short_message) is bytes
                and len(short_message) <= sm_max
                and header_fits(command_status, sequence_number, tlvs)):
            validate(o)
        else:
            text = "".join(strings)
            if not text.isascii() or "\0" in text:
                validate(o)
        return o

    return cast(_SmBuilder, build_sm)


build_sm = _make_sm_builder()


def _make_sm_decoder() -> Callable[[type, bytes, int, int, int], Pdu]:
    s = _SETTERS[SubmitSm]
    assert s == _SETTERS[DeliverSm]  # both inherit every slot from _Sm / _Header
    (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16, s17,
     s18, s19) = s
    new = _new_object
    decode_tlvs = _decode_tlvs
    sm_max = SHORT_MESSAGE_LENGTH_MAX

    def decode_sm(cls: type, d: bytes, cid: int, status: int, seq: int) -> Pdu:
        """Hand-written decoder of the submit_sm / deliver_sm mandatory block: the
        hottest code of the node (every USSD step), hence unrolled. Any irregularity
        falls back to the generic decoder, which names the error precisely."""
        end = len(d)
        find = d.find
        # Each C-string is found with a bounded search; finding the NUL of the next
        # string also proves the fixed octets between the two exist.
        j0 = find(b"\0", 16, 22)
        if j0 < 0:
            return _decode_generic(cls, d, cid, status, seq)
        j1 = find(b"\0", j0 + 3, j0 + 24)
        if j1 < 0:
            return _decode_generic(cls, d, cid, status, seq)
        j2 = find(b"\0", j1 + 3, j1 + 24)
        if j2 < 0:
            return _decode_generic(cls, d, cid, status, seq)
        j3 = find(b"\0", j2 + 4, j2 + 21)
        if j3 < 0:
            return _decode_generic(cls, d, cid, status, seq)
        j4 = find(b"\0", j3 + 1, j3 + 18)
        if j4 < 0 or j4 + 6 > end:
            return _decode_generic(cls, d, cid, status, seq)
        sm_length = d[j4 + 5]
        k = j4 + 6 + sm_length
        if k > end or sm_length > sm_max:
            return _decode_generic(cls, d, cid, status, seq)
        o: Pdu = new(cls)
        s0(o, decode_tlvs(d, k, end, seq, cid) if k < end else ())
        s1(o, status)
        s2(o, seq)
        s3(o, d[16:j0].decode("latin-1") if j0 > 16 else "")
        s4(o, d[j0 + 1])
        s5(o, d[j0 + 2])
        s6(o, d[j0 + 3:j1].decode("latin-1"))
        s7(o, d[j1 + 1])
        s8(o, d[j1 + 2])
        s9(o, d[j1 + 3:j2].decode("latin-1"))
        s10(o, d[j2 + 1])
        s11(o, d[j2 + 2])
        s12(o, d[j2 + 3])
        s13(o, d[j2 + 4:j3].decode("latin-1") if j3 > j2 + 4 else "")
        s14(o, d[j3 + 1:j4].decode("latin-1") if j4 > j3 + 1 else "")
        s15(o, d[j4 + 1])
        s16(o, d[j4 + 2])
        s17(o, d[j4 + 3])
        s18(o, d[j4 + 4])
        s19(o, d[j4 + 6:k])
        pdu: Pdu = o
        return pdu

    return decode_sm


def _decode_generic(cls: type, data: bytes, cid: int, status: int, seq: int) -> Pdu:
    layout = _LAYOUT[cls]
    end = len(data)
    i = 16
    if i == end and layout and is_response(cid):
        # §4: a response with an error status may omit its body; accept it always.
        pdu: Pdu = cls(command_status=status, sequence_number=seq)
        return pdu
    values: list[object] = [_NO_TLVS, status, seq]
    for name, kind, size, bad_status in layout:
        if kind == _C:
            j = data.find(b"\0", i, i + size)
            if j < 0:
                if i + size > end:
                    raise _short(seq, cid, name)
                raise PduDecodeError(
                    bad_status, f"{name} longer than {size - 1} octets",
                    sequence_number=seq, command_id=cid,
                )
            values.append(data[i:j].decode("latin-1"))
            i = j + 1
        elif kind == _U8:
            if i >= end:
                raise _short(seq, cid, name)
            values.append(data[i])
            i += 1
        else:
            if i >= end:
                raise _short(seq, cid, "sm_length")
            n = data[i]
            if n > size:
                raise PduDecodeError(
                    bad_status, f"sm_length {n} > {size}", sequence_number=seq, command_id=cid
                )
            if i + 1 + n > end:
                raise PduDecodeError(
                    bad_status, f"sm_length {n} runs past the PDU",
                    sequence_number=seq, command_id=cid,
                )
            values.append(data[i + 1:i + 1 + n])
            i += 1 + n
    if i < end:
        values[0] = _decode_tlvs(data, i, end, seq, cid)
    return _build(cls, values)


_decode_sm = _make_sm_decoder()


def decode(frame: bytes | bytearray | memoryview) -> Pdu:
    """Decode exactly one PDU; raises PduDecodeError (never anything else)."""
    data = frame if type(frame) is bytes else bytes(frame)
    n = len(data)
    if n < 16:
        raise PduDecodeError(
            Status.ESME_RINVCMDLEN, f"{n} octets, shorter than the header", fatal=True
        )
    length, cid, status, seq = _unpack_header(data, 0)
    if length != n:
        raise PduDecodeError(
            Status.ESME_RINVCMDLEN, f"command_length {length} but frame is {n} octets",
            sequence_number=seq, command_id=cid,
        )
    try:
        if cid == 4 or cid == 5:  # submit_sm, deliver_sm: the hot path
            return _decode_sm(SubmitSm if cid == 4 else DeliverSm, data, cid, status, seq)
        cls = PDU_CLASSES.get(cid)
        if cls is None:
            raise PduDecodeError(
                Status.ESME_RINVCMDID, f"unknown command_id 0x{cid:08X}",
                sequence_number=seq, command_id=cid,
            )
        return _decode_generic(cls, data, cid, status, seq)
    except PduDecodeError:
        raise
    except Exception as exc:  # a codec bug must still become an SMPP answer
        raise PduDecodeError(
            Status.ESME_RUNKNOWNERR, f"{type(exc).__name__}: {exc}",
            sequence_number=seq, command_id=cid,
        ) from exc


# ---------------------------------------------------------------------------
# stream framing


class Framer:
    """Cuts a TCP byte stream into PDU frames, with a bounded PDU length.

    `feed(data)` returns complete frames (bytes) and, in order, a `PduDecodeError`
    for each frame that cannot be taken: a PDU longer than `command_length_max` is
    reported (non-fatal; its bytes are skipped as they arrive, so one bad PDU does
    not cost the bind) unless it is longer than DISCARD_LENGTH_MAX; a
    command_length below 16 cannot be skipped and is fatal.
    """

    __slots__ = ("_buf", "_dead", "_skip", "command_length_max")

    def __init__(self, command_length_max: int = COMMAND_LENGTH_MAX) -> None:
        self._buf = bytearray()
        self._skip = 0
        self._dead = False
        self.command_length_max = command_length_max

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | PduDecodeError]:
        out: list[bytes | PduDecodeError] = []
        if self._dead:
            return out
        buf = self._buf
        if self._skip:
            take = min(self._skip, len(data))
            self._skip -= take
            data = data[take:]
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= 16:
            length = int.from_bytes(buf[pos:pos + 4], "big")
            if length < 16 or length > self.command_length_max:
                cid = int.from_bytes(buf[pos + 4:pos + 8], "big")
                seq = int.from_bytes(buf[pos + 12:pos + 16], "big")
                fatal = length < 16 or length > DISCARD_LENGTH_MAX
                out.append(PduDecodeError(
                    Status.ESME_RINVCMDLEN,
                    f"command_length {length} outside 16..{self.command_length_max}",
                    sequence_number=seq, command_id=cid, fatal=fatal,
                ))
                if fatal:
                    self._dead = True
                    del buf[:]
                    return out
                available = n - pos
                if length <= available:
                    pos += length
                    continue
                self._skip = length - available
                pos = n
                break
            if n - pos < length:
                break
            out.append(bytes(buf[pos:pos + length]))
            pos += length
        if pos:
            del buf[:pos]
        return out
