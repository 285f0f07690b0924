"""USSD over SMPP: builders for the node (submit_sm) and the simulator (deliver_sm),
and the parser of an incoming USSD deliver_sm. Pure functions, no IO.

Conventions (docs/protocols.md): service_type "USSD"; ussd_service_op 0x0501 carries the
dialogue operation; the dialogue id is its_session_info 0x1383 (or
user_message_reference 0x0204), always together with the MSISDN; a vendor value of
ussd_service_op (default 0x81) aborts the dialogue. One screen holds at most 182 GSM
7-bit characters or 80 UCS2 characters: pagination is the caller's job, we refuse.
"""

from __future__ import annotations

from dataclasses import dataclass

from extrabalance.smpp.pdu import (
    DataSm,
    DeliverSm,
    ItsSessionInfo,
    SubmitSm,
    Tag,
    Tlvs,
    UssdOp,
    build_sm,
    tlv_u8,
    tlv_u16,
)
from extrabalance.smpp.text import (
    DC_UCS2,
    DC_USSD_GSM7,
    decode_text,
    gsm7_encode,
    gsm7_length,
    is_gsm7,
    ucs2_encode,
)

__all__ = [
    "ABORT_OP_DEFAULT", "USSD_GSM7_CHARS_MAX", "USSD_UCS2_CHARS_MAX", "UssdIndication",
    "UssdTooLong", "parse_ussd_deliver", "ussd_deliver", "ussd_submit",
]

USSD_GSM7_CHARS_MAX = 182  # 160 octets of packed septets
USSD_UCS2_CHARS_MAX = 80  # 160 octets of UTF-16
ABORT_OP_DEFAULT = 0x81


class UssdTooLong(ValueError):
    """A screen longer than one USSD message: paginate before building it."""


def _encode_screen(text: str, gsm_data_coding: int) -> tuple[int, bytes]:
    if is_gsm7(text):
        if gsm7_length(text) > USSD_GSM7_CHARS_MAX:
            raise UssdTooLong(f"{gsm7_length(text)} GSM septets > {USSD_GSM7_CHARS_MAX}")
        return gsm_data_coding, gsm7_encode(text)
    units = len(text.encode("utf-16-be")) // 2
    if units > USSD_UCS2_CHARS_MAX:
        raise UssdTooLong(f"{units} UCS2 characters > {USSD_UCS2_CHARS_MAX}")
    return DC_UCS2, ucs2_encode(text)


def _tlvs(op: int, session: ItsSessionInfo | None, user_message_reference: int | None) -> Tlvs:
    tlvs = [tlv_u8(Tag.USSD_SERVICE_OP, op)]
    if session is not None:
        tlvs.append(session.as_tlv())
    if user_message_reference is not None:
        tlvs.append(tlv_u16(Tag.USER_MESSAGE_REFERENCE, user_message_reference))
    return tuple(tlvs)


def ussd_submit(
    msisdn: str,
    source_addr: str,
    text: str,
    *,
    op: int = UssdOp.USSR_REQUEST,
    session: ItsSessionInfo | None = None,
    user_message_reference: int | None = None,
    service_type: str = "USSD",
    gsm_data_coding: int = DC_USSD_GSM7,
) -> SubmitSm:
    """A USSD screen for `msisdn`: op 2 USSR request (menu, expects a reply) or 17
    PSSR response (final screen). Pass `session` with end_of_session set on the
    final screen. GSM 7-bit (data_coding 0x0F by default, 0x00 for gateways that want
    it) or UCS2 (0x08) is chosen from the text. Raises UssdTooLong."""
    data_coding, octets = _encode_screen(text, gsm_data_coding)
    return build_sm(
        SubmitSm, service_type=service_type, source_addr_ton=0, source_addr_npi=1,
        source_addr=source_addr, dest_addr_ton=1, dest_addr_npi=1, destination_addr=msisdn,
        data_coding=data_coding, short_message=octets,
        tlvs=_tlvs(op, session, user_message_reference),
    )


def ussd_deliver(
    msisdn: str,
    dest_addr: str,
    text: str,
    *,
    op: int = UssdOp.PSSR_INDICATION,
    session: ItsSessionInfo | None = None,
    user_message_reference: int | None = None,
    service_type: str = "USSD",
    gsm_data_coding: int = DC_USSD_GSM7,
) -> DeliverSm:
    """What a USSD gateway sends the node: op 1 PSSR indication (dialled string,
    new dialogue), 18 USSR confirm (the subscriber's reply), or the abort value."""
    data_coding, octets = _encode_screen(text, gsm_data_coding)
    return build_sm(
        DeliverSm, service_type=service_type, source_addr_ton=1, source_addr_npi=1,
        source_addr=msisdn,
        dest_addr_ton=0, dest_addr_npi=1, destination_addr=dest_addr,
        data_coding=data_coding, short_message=octets,
        tlvs=_tlvs(op, session, user_message_reference),
    )


@dataclass(frozen=True, slots=True)
class UssdIndication:
    msisdn: str
    dest_addr: str
    text: str
    op: int
    session: ItsSessionInfo | None
    user_message_reference: int | None
    is_abort: bool
    service_type: str

    @property
    def is_new_dialog(self) -> bool:
        return self.op == UssdOp.PSSR_INDICATION

    @property
    def is_reply(self) -> bool:
        return self.op == UssdOp.USSR_CONFIRM


def parse_ussd_deliver(
    pdu: DeliverSm | DataSm, *, abort_op: int = ABORT_OP_DEFAULT
) -> UssdIndication | None:
    """The USSD content of a deliver_sm, or None when it carries no ussd_service_op
    (an SMS or a receipt). Raises TlvValueError (with the SMPP status to answer)
    when a USSD TLV has the wrong size."""
    op = pdu.ussd_service_op
    if op is None:
        return None
    raw = pdu.message_payload
    if raw is None:
        raw = getattr(pdu, "short_message", b"")
    return UssdIndication(
        msisdn=pdu.source_addr,
        dest_addr=pdu.destination_addr,
        text=decode_text(pdu.data_coding, raw),
        op=op,
        session=pdu.its_session_info,
        user_message_reference=pdu.user_message_reference,
        is_abort=op == abort_op,
        service_type=pdu.service_type,
    )
