"""The node's SMPP side against the SMSC simulator playing the worst real gateway:
every USSD input and MO SMS repeated under a new sequence number, every submit_sm
answered after the node's response timeout, enquire_link on the gateway's own clock.
No loan without a confirm, one loan per confirm, no screen after a final screen, the
window honoured."""

from __future__ import annotations

import asyncio

from extrabalance.adapters.smpp_channel import SmppChannel
from extrabalance.adapters.sms_notifier import SmsNotifier
from extrabalance.config import load_settings
from extrabalance.service.templates import Templates
from extrabalance.service.ussd import UssdDialogs
from extrabalance.smpp.aio.client import BindConfig, Esme
from simulators.smsc import SmscSimulator
from tests.channels.fake_lending import FakeLending


async def test_repeats_and_a_slow_gateway_never_lend_without_consent():
    s = load_settings()
    t = Templates(s.templates, "en", s.node.currency_exponent)
    lending = FakeLending(s.policy())
    subscribers = [f"2010030{i:05d}" for i in range(12)]
    for msisdn in subscribers:
        lending.add(msisdn, 400, 5000)
    smsc = SmscSimulator(password="pw", repeat_share=1.0, submit_resp_delay_s=0.6,
                         enquire_link_s=0.5, seed=7)
    port = await smsc.start()
    channel: SmppChannel | None = None

    def on_deliver(pdu, bind):
        assert channel is not None
        return channel.on_deliver(pdu, bind)

    esme = Esme([BindConfig("127.0.0.1", port, "extrabalance", "pw", window_max=4,
                            response_timeout_s=0.3)], on_deliver)
    channel = SmppChannel(dialogs=UssdDialogs(lending, t), lending=lending, templates=t,
                          policy=lending.policy, submit=esme.submit,
                          sms=SmsNotifier(esme.send_sms, templates=t, short_code="1234"))
    await esme.start()
    try:
        await esme.wait_bound(5.0)
        await smsc.wait_bound(5.0)

        async def walk(i: int, msisdn: str) -> bool:
            """Half confirm, half cancel at the confirm screen; True if confirmed."""
            phone = smsc.handset(msisdn)
            menu = await phone.dial("*123#", timeout_s=20)
            assert "1 1.00 EGP" in menu.text
            confirm = await phone.reply("1", timeout_s=20)  # tier 1, repeated by the gateway
            assert confirm.text.startswith("Borrow 1.00 EGP?") and not confirm.final
            consent = i % 2 == 0
            final = await phone.reply("1" if consent else "2", timeout_s=20)
            assert final.final
            return consent

        consents = await asyncio.gather(*(walk(i, m) for i, m in enumerate(subscribers)))
        await asyncio.sleep(1.0)  # the late answers and the repeats' screens settle
        granted = [o for o in lending.outcomes.values() if o.status == "GRANTED"]
        assert len(granted) == sum(consents) == len(subscribers) // 2
        assert smsc.stats["repeats_sent"] >= 3 * len(subscribers)
        assert smsc.stats["screens_after_final"] == 0
        assert smsc.stats["its_sequence_mismatch"] == 0
        states = esme.bind_states()[0]
        assert states["late_responses"] > 0 and states["connections_lost"] == 0
        # An MO SMS repeated by the SMSC: one loan.
        sms_subscriber = "201003099999"
        lending.add(sms_subscriber, 400, 5000)
        assert await smsc.send_mo_sms(sms_subscriber, "LOAN 5") == 0
        await asyncio.sleep(0.5)
        assert sum(1 for key in lending.outcomes if sms_subscriber in key) == 1
    finally:
        await esme.close()
        await smsc.close()
