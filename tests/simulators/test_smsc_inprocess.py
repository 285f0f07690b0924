"""SMSC simulator and handset logic with the SMPP transport replaced by an in-process
app (the loopback tests run the same through real SMPP binds)."""

from __future__ import annotations

import asyncio

import pytest

from extrabalance.smpp.pdu import Status, SubmitSm
from extrabalance.smpp.text import split_text
from simulators.handset import HandsetError, ScreenTimeout
from simulators.smsc import DialogIdMode, DialogIds, SmscSimulator
from simulators.traffic import TrafficConfig, TrafficGenerator, TrafficMix
from tests.simulators.fake_esme import InProcessServer, MenuApp

SUB = "201000000001"


def make(**kw: object) -> tuple[SmscSimulator, InProcessServer]:
    smsc = SmscSimulator(seed=3, **kw)  # type: ignore[arg-type]
    server = InProcessServer(smsc, MenuApp())
    smsc._server = server
    return smsc, server


async def test_dial_menu_confirm_and_sms() -> None:
    smsc, _ = make()
    phone = smsc.handset(SUB)
    screen = await phone.dial("*123#")
    assert not screen.final and screen.text.startswith("Extra Balance")
    screen = await phone.reply("2")
    assert not screen.final and "2.00" in screen.text
    screen = await phone.reply("1")
    assert screen.final and screen.text == "Done: 2.00 EGP added."
    assert not phone.dialog_open
    assert await phone.next_sms(1.0) == "Extra Balance: 2.00 EGP added."
    records = smsc.mt(SUB)
    assert [(r.is_ussd, r.ussd_service_op, r.end) for r in records] == [
        (True, 2, False), (True, 2, False), (True, 17, True), (False, None, False)
    ]
    assert len({r.dialog_id for r in records if r.is_ussd}) == 1


async def test_shortcut_and_cancel() -> None:
    smsc, _ = make()
    phone = smsc.handset(SUB)
    screen = await phone.dial("*123*3#")
    assert "3.00" in screen.text
    screen = await phone.reply("2")
    assert screen.final and screen.text == "Cancelled."


async def test_reply_without_dialog_is_an_error() -> None:
    smsc, _ = make()
    with pytest.raises(HandsetError):
        await smsc.handset(SUB).reply("1")


async def test_no_screen_times_out_and_frees_the_dialog() -> None:
    smsc, server = make()
    server.silent = True
    phone = smsc.handset(SUB)
    with pytest.raises(ScreenTimeout):
        await phone.dial("*123#", timeout_s=0.05)
    assert not phone.dialog_open
    assert smsc._waiting == {}
    await asyncio.sleep(0.01)
    # The gateway tells the node the dialog is over, with the configured abort op.
    assert server.delivered[-1].ussd_service_op == 0x81
    assert smsc.stats["screen_timeouts"] == 1


async def test_mo_sms_reaches_the_app_and_long_mt_is_joined() -> None:
    smsc, server = make()
    phone = smsc.handset(SUB)
    assert await phone.send_sms("LOAN 5") == 0
    assert await phone.next_sms(1.0) == "Extra Balance: 5.00 EGP added."
    assert server.app.received[-1].destination_addr == "1234"
    text = "x" * 200 + " end"
    for segment in split_text(text, 7):
        status, _ = smsc._on_submit(
            SubmitSm(destination_addr=SUB, esm_class=segment.esm_class,
                     data_coding=segment.data_coding, short_message=segment.short_message),
            "extrabalance",
        )
        assert status == 0
    assert await phone.next_sms(1.0) == text
    assert smsc.mt_sms(SUB)[-1].text == text and smsc.mt_sms(SUB)[-1].parts == 2


async def test_throttling_share() -> None:
    smsc, _ = make(throttle_share=1.0)
    status, _ = smsc._on_submit(SubmitSm(destination_addr=SUB, short_message=b"hi"), "x")
    assert status == Status.ESME_RTHROTTLED
    assert smsc.mt() == [] and smsc.stats["throttled"] == 1
    smsc.set_throttle(0.0)
    status, _ = smsc._on_submit(SubmitSm(destination_addr=SUB, short_message=b"hi"), "x")
    assert status == 0 and smsc.mt()[0].text == "hi"


async def test_delivery_receipts_when_enabled() -> None:
    smsc, server = make(delivery_receipts=True)
    smsc._on_submit(
        SubmitSm(destination_addr=SUB, short_message=b"hello", registered_delivery=1), "x"
    )
    for _ in range(50):
        if server.receipts:
            break
        import asyncio

        await asyncio.sleep(0.01)
    receipt = server.receipts[0]
    assert receipt.is_delivery_receipt and receipt.receipted_message_id == smsc.mt()[0].message_id
    assert b"stat:DELIVRD" in receipt.short_message


async def test_user_message_reference_mode() -> None:
    smsc, _ = make(dialog_id_mode="user_message_reference")
    phone = smsc.handset(SUB)
    screen = await phone.dial("*123*1#")
    screen = await phone.reply("1")
    assert screen.final
    assert smsc.mt(SUB)[0].dialog_id == 0


def test_dialog_ids_never_reuse_an_open_one() -> None:
    ids = DialogIds(DialogIdMode.ITS_SESSION_INFO)
    taken = {ids.allocate(SUB) for _ in range(256)}
    assert taken == set(range(256))
    with pytest.raises(HandsetError):
        ids.allocate(SUB)
    ids.release(SUB, 17)
    assert ids.allocate(SUB) == 17
    assert ids.allocate("201000000002") == 0


async def test_traffic_generator_ussd_and_sms() -> None:
    smsc, _ = make()
    config = TrafficConfig(
        msisdns=[f"20100000{i:04d}" for i in range(20)],
        mix=TrafficMix(ussd_menu=2, ussd_shortcut=1, sms_loan=1, out_of_balance=0, recharge=0),
        rate_per_s=None, duration_s=None, operations_max=60, concurrency_max=10,
    )
    report = await TrafficGenerator(config, smsc=smsc).run()
    assert report.operations == 60
    outcomes = report.outcomes
    assert sum(outcomes.values()) == 60
    assert all(k.endswith((":final", ":sent")) for k in outcomes), outcomes
    assert len(report.ussd_latency) == outcomes["ussd_menu:final"] + outcomes["ussd_shortcut:final"]
    summary = report.as_dict()["ussd_latency"]
    assert isinstance(summary, dict) and summary["p50_ms"] is not None
