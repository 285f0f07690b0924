"""Each trigger and each suppression reason through the Advertiser over a real ledger."""

from dataclasses import replace

from extrabalance.adapters.gy_server import result_code
from extrabalance.ledger import ads_store
from extrabalance.service.ads import AdTrigger
from tests.ads.conftest import RULES

M = "201001234567"
N = "201001234568"
IN_A = "in-a.operator.example"


def ads_events(h):
    return [(k, f) for k, f in h.events.events if k in ("ad_sent", "ad_suppressed")]


def last_ad_event(h):
    return ads_events(h)[-1]


async def sent_rows(h, msisdn=M):
    return await h.ledger.read(lambda c: c.execute(
        "SELECT ad_trigger, template FROM ads_sent WHERE msisdn = ? ORDER BY sent_at",
        (msisdn,)).fetchall())


# -- triggers ----------------------------------------------------------------------


async def test_out_of_balance_4012_sends_ad(h):
    await h.add_profile(M, tenure_days=100, arpu_minor=100)  # standard segment
    out = await h.lending.out_of_balance("s1", 0, 1, M, None, IN_A)
    assert result_code(out) == 4012
    await h.ads.drain()
    assert [(n.template, n.kind) for n in h.notifier.sent] == [("ad_out_of_balance", "ad")]
    assert last_ad_event(h) == ("ad_sent", {"msisdn": M, "template": "ad_out_of_balance",
                                            "reason": "", "detail": "out_of_balance"})
    assert await sent_rows(h) == [("out_of_balance", "ad_out_of_balance")]
    # a retransmitted CCR is a replay: no second decision
    await h.lending.out_of_balance("s1", 0, 1, M, None, IN_A)
    await h.ads.drain()
    assert len(ads_events(h)) == 1


async def test_out_of_balance_vip_gets_segment_template(h):
    await h.add_profile(M)  # gold
    await h.lending.out_of_balance("s1", 0, 1, M, None, IN_A)
    await h.ads.drain()
    assert h.notifier.sent[-1].template == "ad_out_of_balance_vip"


async def test_out_of_balance_barred_gets_4010_and_no_decision(h):
    await h.add_profile(M)
    await h.accounts.bar(M, "fraud", "ops", notify=False)
    out = await h.lending.out_of_balance("s1", 0, 1, M, None, IN_A)
    assert result_code(out) == 4010
    await h.ads.drain()
    assert h.notifier.sent == [] and ads_events(h) == []


async def test_low_balance_sends_once_per_event(h):
    await h.add_profile(M)
    v = await h.ads.offer(M, AdTrigger.LOW_BALANCE, idempotency_key="lowbalance:IN-A-1")
    assert v.send and h.notifier.sent[-1].template == "ad_low_balance"
    again = await h.ads.offer(M, AdTrigger.LOW_BALANCE, idempotency_key="lowbalance:IN-A-1")
    assert again.replayed and again.send
    assert len(h.notifier.sent) == 1 and len(ads_events(h)) == 1


async def test_debt_limit_after_loan(h):
    await h.add_profile(M)  # gold: ceiling 120.00, 80 % = 96.00
    out = await h.lending.borrow(M, 6, "ussd", "k1")  # 20.00 + 2.00 fee: 22.00 owed
    await h.ads.drain()
    assert out.debt_minor == 2200 and "ad_debt_limit" not in h.notifier.templates()
    out = await h.lending.borrow(M, 11, "ussd", "k2")  # +82.50 -> 104.50: crosses 96.00
    assert out.debt_minor == 10450
    await h.ads.drain()
    ad = h.notifier.sent[-1]
    assert ad.template == "ad_debt_limit" and ad.params == {"debt": 10450} and ad.kind == "ad"


async def test_debt_limit_after_auto_advance(h):
    rules = replace(RULES, debt_limit_share_bp=100)  # 1 % of 120.00: the first advance crosses
    h.ads.set_rules(rules)
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    out = await h.lending.out_of_balance("s1", 0, 1, M, None, IN_A)
    assert result_code(out) == 2001
    await h.ads.drain()
    assert h.notifier.templates() == ["advance_granted", "ad_debt_limit"]


# -- suppression reasons -----------------------------------------------------------


async def test_suppressed_disabled(h):
    h.ads.set_rules(replace(RULES, enabled=False))
    v = await h.ads.offer(M, AdTrigger.LOW_BALANCE)
    assert not v.send and v.reason == "disabled" and h.notifier.sent == []
    assert last_ad_event(h) == ("ad_suppressed", {"msisdn": M, "template": "ad_low_balance",
                                                  "reason": "disabled", "detail": "low_balance"})


async def test_suppressed_opted_out_by_sms_preference(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, ads_opt_out=True)  # what STOP ADS and the menu set
    assert (await h.ads.offer(M, AdTrigger.LOW_BALANCE)).reason == "opted_out"
    await h.lending.set_preferences(M, ads_opt_out=False)  # START ADS
    assert (await h.ads.offer(M, AdTrigger.LOW_BALANCE)).send


async def test_suppressed_barred_manual_and_bad_debt(h):
    await h.add_profile(M)
    await h.accounts.bar(M, "fraud", "ops", notify=False)
    assert (await h.ads.offer(M, AdTrigger.LOW_BALANCE)).reason == "barred"
    await h.add_profile(N)  # gold: bad_debt_limit 3
    for i in range(3):
        await h.lending.borrow(N, 1, "ussd", f"b{i}")
    await h.ads.drain()
    before = len(h.notifier.sent)
    assert (await h.ads.offer(N, AdTrigger.LOW_BALANCE)).reason == "barred"
    assert len(h.notifier.sent) == before


async def test_suppressed_quiet_hours(h):
    await h.add_profile(M)
    h.clock.advance(hours=11)  # 21:00 UTC = 23:00 in Cairo
    v = await h.ads.offer(M, AdTrigger.OUT_OF_BALANCE)
    assert v.reason == "quiet_hours" and h.notifier.sent == []
    h.clock.advance(hours=9)  # 08:00 Cairo: not queued, nothing arrives by itself
    assert h.notifier.sent == []
    assert (await h.ads.offer(M, AdTrigger.OUT_OF_BALANCE)).send


async def test_suppressed_cap_day_cap_interval_cap_trigger(h):
    await h.add_profile(M)
    assert (await h.ads.offer(M, AdTrigger.LOW_BALANCE)).send
    assert (await h.ads.offer(M, AdTrigger.OUT_OF_BALANCE)).reason == "cap_interval"
    h.clock.advance(hours=1)
    assert (await h.ads.offer(M, AdTrigger.LOW_BALANCE)).reason == "cap_trigger"
    assert (await h.ads.offer(M, AdTrigger.OUT_OF_BALANCE)).send
    h.clock.advance(hours=2)
    assert (await h.ads.offer(M, AdTrigger.OUT_OF_BALANCE)).reason == "cap_day"
    h.clock.advance(hours=21, seconds=1)  # the first ad is 24 h old now
    assert (await h.ads.offer(M, AdTrigger.OUT_OF_BALANCE)).send
    reasons = [f["reason"] for k, f in ads_events(h) if k == "ad_suppressed"]
    assert reasons == ["cap_interval", "cap_trigger", "cap_day"]


async def test_suppressed_rate(h):
    h.ads.set_rules(replace(RULES, send_rate_max_per_s=2))
    subscribers = [f"2010000000{i:02d}" for i in range(5)]
    verdicts = [await h.ads.offer(m, AdTrigger.LOW_BALANCE) for m in subscribers]
    assert [v.reason for v in verdicts] == ["", "", "rate", "rate", "rate"]
    assert len(h.notifier.sent) == 2
    h.ticks.now += 0.5  # one token back
    assert (await h.ads.offer(subscribers[2], AdTrigger.LOW_BALANCE)).send
    # a suppressed ad was not recorded, so it does not count against the caps
    assert await sent_rows(h, subscribers[3]) == []


async def test_suppressed_rate_when_smsc_window_full(h):
    import asyncio

    h.ads.set_rules(replace(RULES, inflight_max=1))
    gate = asyncio.Event()
    original = h.notifier.notify

    async def slow(notice):
        await gate.wait()
        await original(notice)

    h.notifier.notify = slow
    first = asyncio.ensure_future(h.ads.offer(M, AdTrigger.LOW_BALANCE))
    await asyncio.sleep(0.05)
    second = await h.ads.offer(N, AdTrigger.LOW_BALANCE)
    assert second.reason == "rate"
    gate.set()
    assert (await first).send


async def test_broken_smsc_does_not_raise(h):
    h.notifier.broken = True
    v = await h.ads.offer(M, AdTrigger.LOW_BALANCE)
    assert v.send  # recorded: the cap counts it even though the SMSC failed


async def test_prune_keeps_the_last_day(h):
    await h.ads.offer(M, AdTrigger.LOW_BALANCE)
    h.clock.advance(hours=24, minutes=30)
    await h.ads.offer(N, AdTrigger.LOW_BALANCE)
    assert await h.ads.prune() == 0
    h.clock.advance(hours=1)
    assert await h.ads.prune() == 1
    assert await sent_rows(h, M) == [] and len(await sent_rows(h, N)) == 1


async def test_metrics_and_edr(tmp_path, h):
    from extrabalance.observability import EdrWriter, EventRecorder, Metrics

    metrics = Metrics()
    edr = EdrWriter(tmp_path / "edr", "n1", clock=lambda: 1_800_000_000)
    h.ads.events = EventRecorder(metrics, edr)
    await h.lending.set_preferences(N, ads_opt_out=True)
    await h.ads.offer(M, AdTrigger.LOW_BALANCE)
    await h.ads.offer(N, AdTrigger.LOW_BALANCE)
    edr.flush()
    assert metrics.ads.labels("sent", "")._value.get() == 1
    assert metrics.ads.labels("suppressed", "opted_out")._value.get() == 1
    lines = next((tmp_path / "edr").iterdir()).read_text().splitlines()
    assert lines[1].split(",")[2:4] == ["ad_sent", M]
    row = dict(zip(lines[0].split(","), lines[2].split(","), strict=True))
    assert (row["template"], row["detail"], row["reason"]) == (
        "ad_low_balance", "low_balance", "opted_out")


async def test_store_row_for_unknown_subscriber(h):
    assert await h.ledger.read(lambda c: ads_store.load_ad_subscriber(c, "999")) is None
    assert (await h.ads.offer("999", AdTrigger.LOW_BALANCE)).send  # no profile: no bar either
