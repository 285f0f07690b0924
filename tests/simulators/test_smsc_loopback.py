"""The SMSC simulator over real SMPP binds on 127.0.0.1, with a tiny ESME in the test
(the shared SMPP client running the menu app of fake_esme.py) standing in for the node."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from extrabalance.smpp.aio.client import BindConfig, Esme, NotBoundError, SubmitError
from extrabalance.smpp.pdu import DeliverSm, Status, SubmitSm
from simulators.handset import RemoteHandset
from simulators.smsc import SmscSimulator
from tests.simulators.fake_esme import MenuApp

SUB = "201000000001"
TIMEOUT_S = 5.0


class MenuEsme:
    """The menu app behind a real bind: answers each deliver_sm, then submits."""

    def __init__(self, port: int, *, password: str = "pw", attempts: int = 6) -> None:
        self.app = MenuApp()
        self.delivered: list[DeliverSm] = []
        self.submit_errors: list[SubmitError] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.esme = Esme(
            [BindConfig("127.0.0.1", port, "node", password, response_timeout_s=2.0,
                        reconnect_backoff_max_s=0.5)],
            self._on_deliver,
            submit_attempts_max=attempts,
            retry_backoff_base_s=0.005,
            retry_backoff_max_s=0.02,
            submit_wait_bound_s=2.0,
        )

    async def _on_deliver(self, pdu: DeliverSm, bind: str) -> int:
        self.delivered.append(pdu)
        if pdu.is_delivery_receipt:
            return 0
        task = asyncio.create_task(self._answer(pdu))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return 0

    async def _answer(self, pdu: DeliverSm) -> None:
        for submit in self.app.handle(pdu):
            try:
                await self.esme.submit(submit)
            except SubmitError as exc:
                self.submit_errors.append(exc)


@pytest.fixture
async def smsc() -> AsyncIterator[SmscSimulator]:
    sim = SmscSimulator(system_id="node", password="pw", control_port=0, seed=5)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.close()


@pytest.fixture
async def node(smsc: SmscSimulator) -> AsyncIterator[MenuEsme]:
    esme = MenuEsme(smsc.port)
    await esme.esme.start()
    await esme.esme.wait_bound(TIMEOUT_S)
    await smsc.wait_bound(TIMEOUT_S)
    try:
        yield esme
    finally:
        await esme.esme.close()


async def test_wrong_password_is_refused(smsc: SmscSimulator) -> None:
    intruder = MenuEsme(smsc.port, password="wrong")
    await intruder.esme.start()
    try:
        with pytest.raises(NotBoundError) as refused:
            await intruder.esme.wait_bound(1.0)
        assert refused.value.status == Status.ESME_RINVPASWD
        assert not smsc.is_bound()
    finally:
        await intruder.esme.close()


async def test_handset_dials_and_replies_over_smpp(smsc: SmscSimulator, node: MenuEsme) -> None:
    phone = smsc.handset(SUB)
    screen = await phone.dial("*123#")
    assert not screen.final and screen.text.startswith("Extra Balance")
    screen = await phone.reply("1")
    assert not screen.final and "1.00" in screen.text
    screen = await phone.reply("1")
    assert screen.final and screen.text == "Done: 1.00 EGP added."
    assert await phone.next_sms(TIMEOUT_S) == "Extra Balance: 1.00 EGP added."
    ussd = [r for r in smsc.mt(SUB) if r.is_ussd]
    assert [r.ussd_service_op for r in ussd] == [2, 2, 17]
    assert ussd[-1].end and all(r.system_id == "node" for r in ussd)
    first_in = node.delivered[0]
    assert (first_in.service_type, first_in.ussd_service_op, first_in.source_addr) == ("USSD", 1, SUB)
    its = first_in.its_session_info
    assert its is not None and its.session_number == ussd[0].dialog_id


async def test_mo_sms_and_reply(smsc: SmscSimulator, node: MenuEsme) -> None:
    phone = smsc.handset(SUB)
    assert await phone.send_sms("loan 5") == 0
    assert await phone.next_sms(TIMEOUT_S) == "Extra Balance: 5.00 EGP added."
    mo = node.delivered[-1]
    assert mo.ussd_service_op is None and mo.destination_addr == smsc.short_code
    record = smsc.mt_sms(SUB)[-1]
    assert (record.is_ussd, record.registered_delivery) == (False, 1)


async def test_throttling_is_seen_by_the_esme(smsc: SmscSimulator) -> None:
    esme = MenuEsme(smsc.port, attempts=1)
    await esme.esme.start()
    try:
        await esme.esme.wait_bound(TIMEOUT_S)
        smsc.set_throttle(1.0)
        with pytest.raises(SubmitError) as throttled:
            await esme.esme.submit(SubmitSm(destination_addr=SUB, short_message=b"hi"))
        assert throttled.value.status == Status.ESME_RTHROTTLED
        assert smsc.stats["throttled"] == 1 and smsc.mt() == []
        smsc.set_throttle(0.0)
        result = await esme.esme.submit(SubmitSm(destination_addr=SUB, short_message=b"hi"))
        assert result.ok and smsc.mt()[0].message_id == result.message_id
    finally:
        await esme.esme.close()


async def test_drop_binds_and_the_esme_comes_back(smsc: SmscSimulator, node: MenuEsme) -> None:
    assert await smsc.drop_binds() == 1
    await smsc.wait_bound(TIMEOUT_S)  # the client reconnects by itself
    screen = await smsc.handset(SUB).dial("*123*2#")
    assert "2.00" in screen.text


async def test_phone_over_the_control_channel(smsc: SmscSimulator, node: MenuEsme) -> None:
    assert smsc.control_port
    link = await RemoteHandset.connect("127.0.0.1", smsc.control_port, SUB)
    try:
        screen = await link.dial("*123*2#")
        assert not screen.final and "2.00" in screen.text
        screen = await link.reply("1")
        assert screen.final
        assert await link.next_sms(TIMEOUT_S) == "Extra Balance: 2.00 EGP added."
        assert await link.send_sms("LOAN") == 0
        assert await link.next_sms(TIMEOUT_S) == "Extra Balance: 5.00 EGP added."
    finally:
        await link.close()


async def test_delivery_receipts(node: MenuEsme, smsc: SmscSimulator) -> None:
    smsc.delivery_receipts = True
    result = await node.esme.submit(
        SubmitSm(destination_addr=SUB, short_message=b"hello", registered_delivery=1)
    )
    async with asyncio.timeout(TIMEOUT_S):
        while not any(p.is_delivery_receipt for p in node.delivered):
            await asyncio.sleep(0.01)
    receipt = next(p for p in node.delivered if p.is_delivery_receipt)
    assert receipt.receipted_message_id == result.message_id
