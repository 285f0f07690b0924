"""Through the real node and the bundled simulators on loopback: the IN's
out-of-balance CCR and the IN's low-balance MQTT message each end as an ad SMS on the
handset, within the caps, with EDR lines."""

import asyncio
import json

import aiomqtt

from extrabalance.demo import A, B, demo_env

IN_A = "in-a.operator.example"


async def publish_low_balance(env, event_id, msisdn, balance_minor=35):
    body = json.dumps({"event_id": event_id, "msisdn": msisdn, "balance_minor": balance_minor,
                       "in_node": IN_A, "timestamp": "2026-11-25T10:15:00Z"})
    async with aiomqtt.Client("127.0.0.1", env.settings.mqtt.port, identifier="test-in-pub") as c:
        await c.publish(f"extrabalance/lowbalance/{IN_A}", body, qos=1)


async def wait_for(predicate, timeout_s=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_out_of_balance_and_low_balance_through_the_node(tmp_path):
    async with demo_env(tmp_path, {"ads": {"min_interval_s": 0}}) as env:
        events = []
        original = env.node.events.emit

        def spy(kind, **fields):
            events.append((kind, fields))
            original(kind, **fields)

        # Watch what the Advertiser reports; the node's recorder still gets it all.
        env.node.ads.events = type("Spy", (), {"emit": staticmethod(spy)})()
        phone_a = env.smsc.handset(A)

        # trigger 1: the IN's out-of-balance CCR -> 4012 -> ad
        env.in_sim.set_balance(A, 0)
        code, _ = await env.in_sim.send_out_of_balance(A)
        assert code == 4012
        assert await phone_a.next_sms(5.0) == (
            "Out of credit? Dial *123# for Extra Balance now and pay later.")

        # trigger 2: low balance over MQTT -> ad_low_balance
        await publish_low_balance(env, "LB-1", A)
        assert await phone_a.next_sms(5.0) == (
            "Running low? Dial *123# for Extra Balance and pay when you recharge.")
        await wait_for(lambda: env.node.low_balance.stats()["acked"] >= 1)

        # the same event again (an IN re-publish): replayed, no SMS, no new EDR line
        await publish_low_balance(env, "LB-1", A)
        await wait_for(lambda: env.node.low_balance.stats()["acked"] >= 2)
        # a third ad in 24 hours is over max_per_day = 2
        await publish_low_balance(env, "LB-2", A)
        await wait_for(lambda: env.node.low_balance.stats()["acked"] >= 3)
        # a bad payload is dead-lettered and acknowledged, not crashing the subscriber
        async with aiomqtt.Client("127.0.0.1", env.settings.mqtt.port, identifier="bad") as c:
            await c.publish(f"extrabalance/lowbalance/{IN_A}", b"{oops", qos=1)
        await wait_for(lambda: env.node.low_balance.stats()["dead_lettered"] >= 1)
        # B said STOP ADS by SMS
        phone_b = env.smsc.handset(B)
        await phone_b.send_sms("STOP ADS")
        assert "no longer receive" in await phone_b.next_sms(5.0)
        await publish_low_balance(env, "LB-3", B)
        await wait_for(lambda: env.node.low_balance.stats()["handled"] >= 4)

        with_ads = [(k, f["msisdn"], f["reason"], f["detail"]) for k, f in events
                    if k.startswith("ad_")]
        assert with_ads == [
            ("ad_sent", A, "", "out_of_balance"),
            ("ad_sent", A, "", "low_balance"),
            ("ad_suppressed", A, "cap_day", "low_balance"),
            ("ad_suppressed", B, "opted_out", "low_balance"),
        ]
        with_metrics = env.node.metrics.ads.labels("suppressed", "cap_day")._value.get()
        assert with_metrics == 1
        env.node.edr.flush()
        edr = "".join(p.read_text() for p in env.node.edr.directory.iterdir())
        assert edr.count(",ad_sent,") == 2 and edr.count(",ad_suppressed,") == 2
