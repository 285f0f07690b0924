"""Virtual subscribers over real sockets: USSD and SMS through the SMSC simulator to a
test ESME, out-of-balance requests and recharges through the IN simulator."""

from __future__ import annotations

from extrabalance.diameter import codec, gy
from extrabalance.diameter.aio.node import DiameterNode, LocalIdentity
from simulators.in_node import InNodeSpec, InSimulator, MsisdnRange, NodePeer
from simulators.smsc import SmscSimulator
from simulators.traffic import TrafficConfig, TrafficGenerator, TrafficMix
from tests.simulators.test_smsc_loopback import MenuEsme


async def test_mixed_traffic_end_to_end() -> None:
    async def grant_all(msg: codec.Message, peer: str) -> codec.Message:
        return gy.build_cca(msg, "eb.test", "test", 2001, 100, currency_numeric=818,
                            currency_exponent=2)

    node = DiameterNode(LocalIdentity("eb.test", "test"), allowed_peers=None,
                        request_handler=grant_all, reconnect_min_s=0.05)
    node_port = await node.listen("127.0.0.1", 0)
    in_sim = InSimulator(
        [InNodeSpec("in-a", "in-a.test", "test", ranges=(MsisdnRange.parse("2010*"),))],
        NodePeer("127.0.0.1", node_port, "eb.test", "test"),
    )
    smsc = SmscSimulator(system_id="node", password="pw")
    esme = None
    try:
        await in_sim.start()
        await in_sim.wait_connected(5.0)
        await smsc.start()
        esme = MenuEsme(smsc.port)
        await esme.esme.start()
        await smsc.wait_bound(5.0)
        msisdns = [f"2010000{i:05d}" for i in range(30)]
        for m in msisdns:
            in_sim.set_balance(m, 50)
        config = TrafficConfig(
            msisdns=msisdns,
            mix=TrafficMix(ussd_menu=3, ussd_shortcut=2, sms_loan=1, out_of_balance=2, recharge=1),
            rate_per_s=None, duration_s=None, operations_max=80, concurrency_max=20, seed=11,
        )
        report = await TrafficGenerator(config, smsc=smsc, in_sim=in_sim).run()
    finally:
        if esme is not None:
            await esme.esme.close()
        await smsc.close()
        await in_sim.close()
        await node.close()
    assert report.operations == 80 == sum(report.outcomes.values())
    expected = {"final", "sent", "result_2001", "done"}
    assert {k.split(":")[1] for k in report.outcomes} <= expected, report.outcomes
    grants = [e for e in in_sim.applied() if e.action == "OUT_OF_BALANCE_GRANT"]
    assert len(grants) == report.started["out_of_balance"]
    recharges = [e for e in in_sim.applied() if e.action == "RECHARGE"]
    assert len(recharges) == report.started["recharge"]
    # Every balance is what the ledger says: 50 spent to zero before each grant.
    for msisdn in msisdns:
        entries = [e for e in in_sim.applied() if e.msisdn == msisdn]
        if entries:
            assert in_sim.balance(msisdn) == entries[-1].balance_after_minor
