"""Campaigns: audience (eligible, never borrowed), queue in the ledger, drain through
the Advertiser at the campaign rate, and the `extrabalance campaign` command."""

import json
from dataclasses import replace

from extrabalance.ledger import ads_store
from extrabalance.service.ads import AdTrigger
from extrabalance.service.campaign import CampaignService
from tests.ads.conftest import RULES

GOLD_1, GOLD_2, STD, YOUNG, BORROWER, OPTED, BARRED = (
    "201001000001", "201001000002", "201001000003", "201001000004", "201001000005",
    "201001000006", "201001000007")


async def audience_setup(h):
    await h.add_profile(GOLD_1)
    await h.add_profile(GOLD_2)
    await h.add_profile(STD, tenure_days=100, arpu_minor=100)
    await h.add_profile(YOUNG, tenure_days=10, arpu_minor=100, region="cairo")  # tenure < 30
    await h.add_profile(BORROWER)
    await h.lending.borrow(BORROWER, 1, "ussd", "k")
    await h.add_profile(OPTED)
    await h.lending.set_preferences(OPTED, ads_opt_out=True)
    await h.add_profile(BARRED)
    await h.accounts.bar(BARRED, "fraud", "ops", notify=False)
    await h.ads.drain()
    h.notifier.sent.clear()


def service(h, **kw):
    return CampaignService(h.ledger, h.ads, h.policy, h.clock, **kw)


async def test_preview_counts_eligible_never_borrowed(h):
    await audience_setup(h)
    svc = service(h)
    whole = await svc.preview(None, None)
    assert whole.count == 3 and whole.sample == (GOLD_1, GOLD_2, STD)
    assert (await svc.preview("gold", None)).sample == (GOLD_1, GOLD_2)
    assert (await svc.preview(None, 1)).count == 1
    assert h.notifier.sent == []  # a preview sends nothing


async def test_campaign_trigger_drains_through_the_caps(h):
    await audience_setup(h)
    svc = service(h, batch_max=2, send_rate_max_per_s=1000)
    await h.ads.offer(GOLD_2, AdTrigger.LOW_BALANCE)  # GOLD_2 had an ad 0 s ago
    row = await svc.create("ad_campaign", None, None, "tester")
    assert row.state == ads_store.QUEUED and row.recipients == 3
    assert await svc.drain_once() == 2
    assert await svc.drain_once() == 1
    assert await svc.drain_once() == 0  # nothing pending: DONE
    done = (await svc.list())[0]
    assert (done.state, done.sent, done.suppressed) == ("DONE", 2, 1)
    assert [n.msisdn for n in h.notifier.sent if n.template == "ad_campaign"] == [GOLD_1, STD]
    reasons = await h.ledger.read(lambda c: c.execute(
        "SELECT msisdn, state, reason FROM campaign_recipients ORDER BY msisdn").fetchall())
    assert (GOLD_2, "SUPPRESSED", "cap_interval") in reasons


async def test_campaign_waits_out_quiet_hours_and_can_be_cancelled(h):
    await audience_setup(h)
    svc = service(h)
    row = await svc.create("ad_campaign", "gold", None, "tester")
    h.clock.advance(hours=11)  # 23:00 Cairo
    assert await svc.drain_once() == 0
    assert (await svc.list())[0].pending == 2  # kept, not suppressed
    assert await svc.cancel(row.campaign_id)
    h.clock.advance(hours=10)
    assert await svc.drain_once() == 0 and h.notifier.sent == []


async def test_campaign_disabled_trigger_suppresses(h):
    await audience_setup(h)
    h.ads.set_rules(replace(RULES, triggers_disabled=frozenset({AdTrigger.CAMPAIGN})))
    svc = service(h)
    await svc.create("ad_campaign", None, 2, "tester")
    assert await svc.drain_once() == 2
    assert (await svc.list())[0].suppressed == 2 and h.notifier.sent == []


def test_cli_dry_run_prints_count_then_sample_and_queues_nothing(tmp_path, capsys):
    import asyncio

    from extrabalance.cli import main
    from extrabalance.ledger import Ledger

    db = tmp_path / "eb.db"
    config = tmp_path / "eb.toml"
    from extrabalance.config import default_config_text

    config.write_text(default_config_text().replace('path = "var/extrabalance.db"',
                                                    f'path = "{db}"'), encoding="utf-8")

    async def seed():
        ledger = Ledger(db)
        await ledger.write(lambda c: [c.execute(
            "INSERT INTO subscribers (msisdn, tenure_days, arpu_minor, updated_at)"
            " VALUES (?, ?, ?, '2026-01-01T00:00:00+00:00')", (m, t, a))
            for m, t, a in [("201001000001", 800, 30000), ("201001000002", 200, 4000),
                            ("201001000003", 10, 0)]])
        await ledger.close()

    asyncio.run(seed())
    assert main(["campaign", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 subscribers would get 'ad_campaign'")
    assert out[1].strip() == "2010*****001"  # masked as in the logs
    assert main(["campaign", "--config", str(config), "--dry-run", "--segment", "vip",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 1
    assert main(["campaign", "--config", str(config), "--list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["campaign", "--config", str(config), "--limit", "1"]) == 0
    assert "1 recipients" in capsys.readouterr().out
    assert main(["campaign", "--config", str(config), "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["state"], c["pending"]) for c in listed] == [("QUEUED", 1)]
    assert main(["campaign", "--config", str(config), "--segment", "gold", "--dry-run"]) == 2
    assert main(["campaign", "--config", str(config), "--template", "nope", "--dry-run"]) == 2
