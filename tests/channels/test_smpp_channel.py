"""The SMPP channel: a long SMS in parts is answered once, after its last part."""

from __future__ import annotations

import asyncio

from extrabalance.adapters.smpp_channel import SmppChannel
from extrabalance.adapters.sms_notifier import SmsNotifier
from extrabalance.config import load_settings
from extrabalance.service.templates import Templates
from extrabalance.service.ussd import UssdDialogs
from extrabalance.smpp.pdu import DeliverSm
from extrabalance.smpp.text import split_text
from tests.channels.fake_lending import FakeLending

M = "201001234567"


def channel_with(lending: FakeLending, sent: list[tuple[str, str]], *,
                 receipts: list[bool] | None = None, delivery_receipts: bool = True,
                 **options) -> SmppChannel:
    s = load_settings()
    t = Templates(s.templates, "en", 2)

    async def submit(pdu, **_):  # USSD screens: not used here
        return None

    async def send_sms(source, dest, text, *, registered_delivery=True):
        sent.append((dest, text))
        if receipts is not None:
            receipts.append(registered_delivery)
        return []

    return SmppChannel(dialogs=UssdDialogs(lending, t), lending=lending, templates=t,
                       policy=lending.policy, submit=submit,
                       sms=SmsNotifier(send_sms, templates=t, short_code="1234",
                                       delivery_receipts=delivery_receipts),
                       **options)


async def test_delivery_receipts_are_asked_for_unless_turned_off():
    lending = FakeLending(load_settings().policy())
    for options, wanted in (({}, True), ({"delivery_receipts": False}, False)):
        sent: list[tuple[str, str]] = []
        receipts: list[bool] = []
        ch = channel_with(lending, sent, receipts=receipts, **options)
        ch.on_deliver(DeliverSm(source_addr=M, destination_addr="1234", short_message=b"HELP"),
                      "bind-1")
        await asyncio.sleep(0.05)
        assert len(sent) == 1 and receipts == [wanted]


async def test_long_mo_sms_is_reassembled_before_it_is_read():
    lending = FakeLending(load_settings().policy())
    lending.add(M, 400, 5000)
    sent: list[tuple[str, str]] = []
    ch = channel_with(lending, sent)
    parts = split_text("balance please " + "x" * 150, reference=7)  # > 160: two UDH parts
    assert len(parts) == 2
    for part in parts:
        pdu = DeliverSm(source_addr=M, destination_addr="1234", esm_class=part.esm_class,
                        data_coding=part.data_coding, short_message=part.short_message)
        assert ch.on_deliver(pdu, "bind-1") == 0
        await asyncio.sleep(0.01)
    # One reply for the whole message (it is not a keyword: the helpful answer).
    assert len(sent) == 1 and sent[0][0] == M
    assert sent[0][1].startswith("Sorry, we did not understand.")


async def test_loan_keyword_in_one_part_lends_once():
    lending = FakeLending(load_settings().policy())
    lending.add(M, 400, 5000)
    sent: list[tuple[str, str]] = []
    ch = channel_with(lending, sent)
    pdu = DeliverSm(source_addr=M, destination_addr="1234", short_message=b"LOAN 5",
                    sequence_number=42)
    ch.on_deliver(pdu, "bind-1")
    ch.on_deliver(pdu, "bind-1")  # the SMSC re-sent it after a lost response
    await asyncio.sleep(0.05)
    assert lending.borrow_calls == 1


async def test_source_longer_than_e164_is_refused_like_the_admin_api_does():
    # E.164: at most 15 digits. 16 are refused at the SMPP edge (as by the admin API
    # and the phone simulator), with the SMPP 3.4 status for a bad source address.
    from extrabalance.core.msisdn import MSISDN_DIGITS_MAX, is_msisdn
    from extrabalance.smpp.pdu import Status

    lending = FakeLending(load_settings().policy())
    sent: list[tuple[str, str]] = []
    ch = channel_with(lending, sent)
    too_long = "2" * (MSISDN_DIGITS_MAX + 1)
    assert not is_msisdn(too_long) and is_msisdn("2" * MSISDN_DIGITS_MAX)
    status = ch.on_deliver(DeliverSm(source_addr=too_long, destination_addr="1234",
                                     short_message=b"HELP"), "bind-1")
    assert status == Status.ESME_RINVSRCADR
    await asyncio.sleep(0.05)
    assert sent == []


async def test_loan_keyword_resent_with_a_new_sequence_number_lends_once():
    """An SMSC that missed our deliver_sm_resp re-sends the MO under a new sequence
    number (and maybe on another bind): one loan. The same request after the window
    is a new one."""
    lending = FakeLending(load_settings().policy())
    lending.add(M, 400, 5000)
    sent: list[tuple[str, str]] = []
    now = [1000.0]
    ch = channel_with(lending, sent, clock=lambda: now[0])
    for seq, bind, text in ((42, "bind-1", b"LOAN 5"), (43, "bind-1", b"LOAN 5"),
                            (7, "bind-2", b"loan  5")):
        ch.on_deliver(DeliverSm(source_addr=M, destination_addr="1234", short_message=text,
                                sequence_number=seq), bind)
        await asyncio.sleep(0.01)
        now[0] += 10
    assert lending.borrow_calls == 1
    assert ch.stats["sms_repeats"] == 2
    now[0] += 200  # past the 120 s window: the subscriber asks again
    ch.on_deliver(DeliverSm(source_addr=M, destination_addr="1234", short_message=b"LOAN 5",
                            sequence_number=44), "bind-1")
    await asyncio.sleep(0.01)
    assert lending.borrow_calls == 2


async def settle(ch: SmppChannel) -> None:
    """Until the channel has handled what it took (no clock involved)."""
    while ch.inflight:
        await asyncio.sleep(0)


async def test_yes_goes_to_the_lending_service_once_and_its_answer_is_sent():
    """The reply YES (or نعم) completes what waits for it; the SMSC's re-send of the
    same YES within the window is not a second answer."""
    lending = FakeLending(load_settings().policy())
    calls: list[str] = []

    async def confirm_by_reply(msisdn: str) -> str | None:
        calls.append(msisdn)
        return "nothing_to_confirm"

    lending.confirm_by_reply = confirm_by_reply  # type: ignore[method-assign]
    sent: list[tuple[str, str]] = []
    now = [1000.0]
    ch = channel_with(lending, sent, clock=lambda: now[0])
    for seq, text in ((1, b"YES"), (2, b"yes")):
        ch.on_deliver(DeliverSm(source_addr=M, destination_addr="1234", short_message=text,
                                sequence_number=seq), "bind-1")
        await settle(ch)
        now[0] += 5
    assert calls == [M] and len(sent) == 1
    assert sent[0][1].startswith("There is nothing to confirm now.")
    now[0] += 200
    ch.on_deliver(DeliverSm(source_addr=M, destination_addr="1234", data_coding=8,
                            short_message="نعم".encode("utf-16-be"), sequence_number=3), "bind-1")
    await settle(ch)
    assert calls == [M, M] and sent[-1][1].startswith("لا يوجد ما يحتاج تأكيدا")


async def test_data_without_bundles_says_so_and_loan_by_amount_never_takes_a_bundle():
    import dataclasses

    from extrabalance.core.policy import Bundle, Tier

    sent: list[tuple[str, str]] = []
    lending = FakeLending(load_settings().policy())
    lending.add(M, 400, 5000)
    ch = channel_with(lending, sent)
    ch.on_deliver(DeliverSm(source_addr=M, destination_addr="1234", short_message=b"DATA",
                            sequence_number=1), "bind-1")
    await settle(ch)
    assert lending.borrow_calls == 0 and sent[-1][1].startswith("There is no data bundle")

    policy = lending.policy
    regular = next(s for s in policy.segments if s.name == "regular")
    bundle = Tier(13, 500, Bundle("data", 2**20, rating_group=10))  # priced like tier 4
    lending.policy = dataclasses.replace(
        policy, tiers={13: bundle, **policy.tiers},
        segments=tuple(dataclasses.replace(s, tier_ids=(*s.tier_ids, 13)) if s is regular
                       else s for s in policy.segments))
    ch = channel_with(lending, sent)
    for seq, text in ((2, b"LOAN 5"), (3, b"DATA")):
        ch.on_deliver(DeliverSm(source_addr=M, destination_addr="1234", short_message=text,
                                sequence_number=seq), "bind-1")
        await settle(ch)
    taken = [o.tier_id for o in lending.outcomes.values()]
    assert taken == [4, 13]  # 5.00 EGP of airtime, then the data bundle
