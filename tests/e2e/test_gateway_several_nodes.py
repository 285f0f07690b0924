"""The USSD gateway in front of two nodes sharing one ledger, over real SMPP on 127.0.0.1.

Each node is its own SMPP client, channel and dialog memory (as in two processes);
the lending service, the ledger's decisions, is one object they share. The gateway
(SmscSimulator) spreads new dialogs over the nodes' binds and keeps each dialog on
its bind; when that bind goes, the next input goes to the other node, which does not
know the dialog. That must never lend without the subscriber's confirmation, and the
subscriber must see a clear final screen.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from extrabalance.adapters.smpp_channel import SmppChannel
from extrabalance.adapters.sms_notifier import SmsNotifier
from extrabalance.config import load_settings
from extrabalance.service.templates import Templates
from extrabalance.service.ussd import UssdDialogs
from extrabalance.smpp.aio.client import BindConfig, Esme
from simulators.smsc import SmscSimulator
from tests.channels.fake_lending import FakeLending

EXPIRED = "Session expired. Dial *123# again."
TIMEOUT_S = 10.0


@dataclass
class Node:
    name: str
    esme: Esme | None = None
    # (MSISDN, its_session_info session number) of every USSD input this node got
    inputs: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Cluster:
    smsc: SmscSimulator
    lending: FakeLending
    nodes: list[Node]

    def node_of(self, msisdn: str) -> Node:
        [node] = [n for n in self.nodes if any(m == msisdn for m, _ in n.inputs)]
        return node


async def start_node(name: str, port: int, lending: FakeLending, templates: Templates) -> Node:
    node = Node(name)
    channel: SmppChannel | None = None

    def on_deliver(pdu: Any, bind: Any) -> Any:
        assert channel is not None
        session = pdu.its_session_info
        if session is not None:
            node.inputs.append((pdu.source_addr, session.session_number))
        return channel.on_deliver(pdu, bind)

    node.esme = Esme([BindConfig("127.0.0.1", port, "extrabalance", "pw", window_max=4,
                                 response_timeout_s=1.0)], on_deliver)
    channel = SmppChannel(dialogs=UssdDialogs(lending, templates), lending=lending,
                          templates=templates, policy=lending.policy, submit=node.esme.submit,
                          sms=SmsNotifier(node.esme.send_sms, templates=templates,
                                          short_code="1234"))
    await node.esme.start()
    await node.esme.wait_bound(TIMEOUT_S)
    return node


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    settings = load_settings()
    templates = Templates(settings.templates, "en", settings.node.currency_exponent)
    lending = FakeLending(settings.policy())
    smsc = SmscSimulator(password="pw", seed=5)
    port = await smsc.start()
    nodes = [await start_node(f"eb{i}", port, lending, templates) for i in (1, 2)]
    async with asyncio.timeout(TIMEOUT_S):
        while len(smsc.binds()) < 2:
            await asyncio.sleep(0.01)
    try:
        yield Cluster(smsc, lending, nodes)
    finally:
        for node in nodes:
            assert node.esme is not None
            await node.esme.close()
        await smsc.close()


def subscriber(cluster: Cluster, i: int) -> str:
    msisdn = f"2010040{i:05d}"
    cluster.lending.add(msisdn, 400, 5000)
    return msisdn


async def test_dialogs_are_spread_over_the_nodes_and_each_stays_on_its_bind(
    cluster: Cluster,
) -> None:
    msisdns = [subscriber(cluster, i) for i in range(8)]

    async def walk(msisdn: str) -> None:
        phone = cluster.smsc.handset(msisdn)
        await phone.dial("*123#", timeout_s=TIMEOUT_S)
        confirm = await phone.reply("1", timeout_s=TIMEOUT_S)
        assert confirm.text.startswith("Borrow 1.00 EGP?")
        final = await phone.reply("2", timeout_s=TIMEOUT_S)  # cancel
        assert final.final and final.text.startswith("Cancelled")

    await asyncio.gather(*(walk(m) for m in msisdns))
    # Both nodes served dialogs; every dialog's three inputs reached one node.
    per_node = [len(n.inputs) for n in cluster.nodes]
    assert sum(per_node) == 3 * len(msisdns) and min(per_node) > 0
    for msisdn in msisdns:
        cluster.node_of(msisdn)
    assert cluster.smsc.stats["dialogs_moved"] == 0
    assert cluster.lending.outcomes == {}


async def test_node_gone_at_the_confirm_screen_the_other_node_lends_nothing(
    cluster: Cluster,
) -> None:
    msisdn = subscriber(cluster, 100)
    phone = cluster.smsc.handset(msisdn)
    await phone.dial("*123#", timeout_s=TIMEOUT_S)
    confirm = await phone.reply("1", timeout_s=TIMEOUT_S)
    assert confirm.text.startswith("Borrow 1.00 EGP?") and not confirm.final
    first = cluster.node_of(msisdn)
    other = next(n for n in cluster.nodes if n is not first)
    assert first.esme is not None
    await first.esme.close()  # the node that showed the confirm screen stops
    # The confirmation goes to the other node's bind; that node never showed this
    # dialog a confirm screen: it ends it with a clear screen and lends nothing.
    final = await phone.reply("1", timeout_s=TIMEOUT_S)
    assert final.final and final.text == EXPIRED
    assert cluster.smsc.stats["dialogs_moved"] == 1
    assert [m for m, _ in other.inputs] == [msisdn]
    assert cluster.lending.borrow_calls == 0 and cluster.lending.outcomes == {}
    # Dialling again works on the node that is left, and lends once on consent.
    await phone.dial("*123#", timeout_s=TIMEOUT_S)
    await phone.reply("1", timeout_s=TIMEOUT_S)
    done = await phone.reply("1", timeout_s=TIMEOUT_S)
    assert done.final and done.text.startswith("Done:")
    assert [o.status for o in cluster.lending.outcomes.values()] == ["GRANTED"]


async def test_binds_cut_mid_dialog_never_lend_without_consent(cluster: Cluster) -> None:
    """The gateway cuts the bind of each dialog at its confirm screen; the node stays up
    and binds again. Whichever node the confirmation or the cancel then reaches, only a
    confirmation lends, at most once, and every dialog ends on a final screen.

    One dialog after the other, so that each cut finds its bind quiet: a cut with other
    dialogs' screens in flight makes their node submit those screens again on its new
    bind (their submit_sm_resp was lost), and such a late copy of the confirm screen
    can then reach the handset in place of the final one: a clear screen still, but
    one this test would have to answer again."""
    msisdns = [subscriber(cluster, 200 + i) for i in range(6)]

    async def walk(i: int, msisdn: str) -> tuple[bool, str]:
        phone = cluster.smsc.handset(msisdn)
        await phone.dial("*123#", timeout_s=TIMEOUT_S)
        confirm = await phone.reply("1", timeout_s=TIMEOUT_S)
        assert confirm.text.startswith("Borrow 1.00 EGP?")
        dialog_id = phone._dialog_id
        assert dialog_id is not None
        async with asyncio.timeout(TIMEOUT_S):  # the cut node has bound again
            while len(cluster.smsc.binds()) < 2:
                await asyncio.sleep(0.01)
        assert await cluster.smsc.drop_dialog_bind(msisdn, dialog_id)
        consent = i % 2 == 0
        final = await phone.reply("1" if consent else "2", timeout_s=TIMEOUT_S)
        assert final.final
        if consent:
            assert final.text == EXPIRED or final.text.startswith("Done:")
        else:
            assert final.text == EXPIRED or final.text.startswith("Cancelled")
        return consent, final.text

    results = [await walk(i, m) for i, m in enumerate(msisdns)]
    await asyncio.sleep(0.5)  # screens of inputs that reached two nodes settle
    granted = [o for o in cluster.lending.outcomes.values() if o.status == "GRANTED"]
    for msisdn, (consent, text) in zip(msisdns, results, strict=True):
        loans = cluster.lending.states[msisdn].open_loans
        # Only a confirmation lends, and once. A "Done" screen always has its loan; a
        # confirmation can also lend behind an "expired" screen: its input reached the
        # first node, whose bind then died before answering, and the gateway gave it
        # to the other node too (the loan's SMS tells the subscriber).
        assert len(loans) <= (1 if consent else 0)
        if text.startswith("Done:"):
            assert len(loans) == 1
    assert len(granted) <= len(msisdns[::2])
    assert cluster.smsc.stats["dialogs_moved"] == len(msisdns)
