"""What the 1M-frame fuzz run found in SmppChannel, pinned: a malformed TLV the
channel reads gets its own deliver_sm_resp status, and a USSD message without its
operation is refused; neither reaches a handler (which used to raise in its task)."""

from __future__ import annotations

import asyncio

from extrabalance.config import load_settings
from extrabalance.smpp.pdu import DeliverSm, Status, Tag
from tests.channels.fake_lending import FakeLending
from tests.channels.test_smpp_channel import M, channel_with


def sms(**fields: object) -> DeliverSm:
    return DeliverSm(source_addr=M, destination_addr="1234", short_message=b"HELP",
                     **fields)  # type: ignore[arg-type]


async def test_malformed_tlvs_are_answered_with_their_status_not_handled() -> None:
    lending = FakeLending(load_settings().policy())
    sent: list[tuple[str, str]] = []
    ch = channel_with(lending, sent)
    cases = [
        (Tag.USSD_SERVICE_OP, b""),  # 1 octet expected
        (Tag.USER_MESSAGE_REFERENCE, b"\x01\x02\x03"),  # 2 expected
        (Tag.USER_MESSAGE_REFERENCE, b""),
    ]
    for tag, value in cases:
        status = ch.on_deliver(sms(tlvs=((int(tag), value),)), "bind-1")
        assert status not in (0, int(Status.ESME_RX_T_APPN)), (tag, status)
    assert ch.stats["rejected"] == len(cases)
    assert ch.inflight == 0
    await asyncio.sleep(0)
    assert sent == []


async def test_ussd_service_type_without_its_operation_is_refused() -> None:
    lending = FakeLending(load_settings().policy())
    ch = channel_with(lending, [])
    status = ch.on_deliver(DeliverSm(service_type="USSD", source_addr=M,
                                     destination_addr="*123#", short_message=b"*123#"),
                           "bind-1")
    assert status == int(Status.ESME_RMISSINGOPTPARAM)
    assert ch.inflight == 0


async def test_a_sound_sms_still_goes_through() -> None:
    lending = FakeLending(load_settings().policy())
    sent: list[tuple[str, str]] = []
    ch = channel_with(lending, sent)
    assert ch.on_deliver(sms(), "bind-1") == 0
    for _ in range(50):
        if sent:
            break
        await asyncio.sleep(0.01)
    assert sent and sent[0][0] == M
