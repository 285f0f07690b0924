"""Two real nodes on one PostgreSQL ledger, one IN simulator that knows both (one
realm, each node its own Origin-Host), one SMSC simulator both bind to, one private
Mosquitto with the nodes in one shared-subscription group. Loans are taken on both
nodes (one subscriber on both at once), then every subscriber recharges: each
recharge is paid back once, by one of the two nodes, and the ledger agrees with what
the IN credited and debited."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from extrabalance.config import load_settings
from extrabalance.demo import (
    DEMO_SMPP_PASSWORD_ENV,
    _put_profiles,
    free_port,
    loopback_overrides,
)
from extrabalance.mosquitto import MosquittoBroker, find_mosquitto
from extrabalance.node import Node
from simulators.in_node import InNodeSpec, InSimulator, MqttTarget, MsisdnRange, NodePeer
from simulators.smsc import SmscSimulator
from tests.pg import admin_connection, fresh_schema_url

SUBSCRIBERS = [f"2010010{n:05d}" for n in range(30)]
BOTH = SUBSCRIBERS[0]  # borrows on both nodes at once
WAIT_S = 60.0


def _node_settings(base: Any, name: str, url: str, tmp: Path, *, diameter_port: int,
                   in_ports: dict[str, int], smsc_port: int, mqtt_port: int) -> Any:
    overrides = loopback_overrides(base, diameter_port=diameter_port, in_ports=in_ports,
                                   smsc_port=smsc_port, mqtt_port=mqtt_port,
                                   mqtt_client_id=f"extrabalance-{name}")
    overrides["mqtt"]["shared_group"] = "extrabalance"
    return load_settings(overrides={
        **overrides,
        "node": {"name": name, "origin_host": f"{name}.operator.example"},
        "storage": {"backend": "postgresql", "url": url, "pool_max": 3,
                    "edr_dir": str(tmp / name / "edr")},
        "ads": {"enabled": False},  # no offer SMS interleaved with the paybacks
    })


async def _stop(nodes: list[Node]) -> None:
    while nodes:
        await nodes.pop().stop()


@pytest.mark.skipif(find_mosquitto() is None, reason="needs Mosquitto (make test installs it)")
async def test_two_nodes_share_one_ledger_and_each_recharge_is_paid_back_once(
        tmp_path: Path) -> None:
    admin_connection().close()  # skips, saying why, when no server answers
    base = load_settings()
    names = ("eb-node-1", "eb-node-2")
    broker = MosquittoBroker(tmp_path / "mosquitto").start()
    nodes: list[Node] = []
    in_sim: InSimulator | None = None
    smsc: SmscSimulator | None = None
    try:
        with fresh_schema_url("eb_two") as url:
            diameter_ports = {name: free_port() for name in names}
            in_sim = InSimulator(
                [InNodeSpec(n.name, n.origin_host, n.realm, ranges=tuple(
                    MsisdnRange.parse(f"{r.start}-{r.end}" if r.start else f"{r.prefix}*")
                    for r in n.ranges)) for n in base.in_nodes],
                [NodePeer("127.0.0.1", diameter_ports[name], f"{name}.operator.example",
                          base.node.origin_realm) for name in names],
                base.node.currency_numeric, base.node.currency_exponent,
                base.diameter.service_context_id, currency=base.node.currency,
                mqtt=MqttTarget("127.0.0.1", broker.port),
            )
            in_ports = await in_sim.start()
            os.environ[DEMO_SMPP_PASSWORD_ENV] = os.urandom(4).hex()
            smsc = SmscSimulator(system_id="extrabalance",
                                 password=os.environ[DEMO_SMPP_PASSWORD_ENV],
                                 short_code=base.smpp.short_code)
            smsc_port = await smsc.start()
            phones = {m: smsc.handset(m) for m in SUBSCRIBERS}  # their SMS inboxes
            settings = [
                _node_settings(base, name, url, tmp_path, diameter_port=diameter_ports[name],
                               in_ports=in_ports, smsc_port=smsc_port, mqtt_port=broker.port)
                for name in names]
            profiles = tmp_path / "profiles.csv"
            profiles.write_text("msisdn,tenure_days,arpu_minor,language\n" + "".join(
                f"{m},400,5000,en\n" for m in SUBSCRIBERS), encoding="utf-8")
            await _put_profiles(settings[0], profiles)
            for s in settings:
                node = Node(s)
                nodes.append(node)
                await node.start()
            for node in nodes:
                await node.wait_connected(10.0)

            # Loans on both nodes; BOTH asks both nodes at once with one request key.
            work = [nodes[i % 2].lending.borrow(m, 4, "sms", f"sms:{m}")
                    for i, m in enumerate(SUBSCRIBERS)]
            work.append(nodes[1].lending.borrow(BOTH, 4, "sms", f"sms:{BOTH}"))
            outcomes = await asyncio.gather(*work)
            assert all(o.status.value == "GRANTED" for o in outcomes[:-1]), outcomes
            # BOTH's second node answered his one loan: granted, or still being credited
            assert outcomes[-1].loan_id == outcomes[0].loan_id, outcomes[-1]
            assert outcomes[-1].status.value in ("GRANTED", "PENDING")
            for m in SUBSCRIBERS:
                in_sim.spend(m)  # the credit is used: only a recharge pays back
                await in_sim.recharge(m, 1000)  # 10.00: more than the 5.50 owed

            ledger = nodes[0].ledger
            deadline = time.monotonic() + WAIT_S
            while True:
                done = await ledger.read(lambda tx: tx.conn.execute(
                    "SELECT COUNT(*), COUNT(DISTINCT event_id), COALESCE(SUM(recovered_minor), 0)"
                    " FROM recoveries WHERE state = 'DONE'").fetchone())
                if done[0] >= len(SUBSCRIBERS) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            count = len(SUBSCRIBERS)
            assert (done[0], done[1], int(done[2])) == (count, count, count * 550)
            debits = [op for op in in_sim.applied()
                      if op.action == "DIRECT_DEBITING" and op.result_code == 2001]
            assert len(debits) == count and sum(op.amount_minor for op in debits) == count * 550
            credits = [op for op in in_sim.applied()
                       if op.action == "REFUND_ACCOUNT" and op.result_code == 2001]
            assert len(credits) == count  # one loan each, BOTH's included
            assert {in_sim.balance(m) for m in SUBSCRIBERS} == {450}
            totals = await ledger.account_totals()
            assert sum(totals.values()) == 0
            assert totals.get("principal_receivable", 0) + totals.get("fee_receivable", 0) == 0
            handled = [node.recharges.stats()["handled"] for node in nodes]
            assert sum(handled) == count and min(handled) > 0, handled  # both took a share
            # Every message once, by one node's sender: the loan SMS, the payback SMS.
            for node in nodes:
                await node.outbox.drain()
            got = {m: list(phone.inbox) for m, phone in phones.items()}
            assert all(len(texts) == 2 for texts in got.values()), got
            await _stop(nodes)
    finally:
        await _stop(nodes)
        if smsc is not None:
            await smsc.close()
        if in_sim is not None:
            await in_sim.close()
        broker.stop()
