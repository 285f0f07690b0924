"""The do-not-disturb list: a listed subscriber never gets an advertisement, whatever
the trigger, the campaign or his own preference; taken off the list, he gets them
again; the import reads a file of MSISDNs in batches and reports bad lines."""

from __future__ import annotations

from extrabalance.service.ads import AdTrigger
from extrabalance.service.campaign import CampaignService
from extrabalance.service.dnd import DoNotDisturb

LISTED, FREE, STRANGER = "201001000001", "201001000002", "201009999999"
IN_A = "in-a.operator.example"


def ads_to(h, msisdn):
    return [n for n in h.notifier.sent if n.kind == "ad" and n.msisdn == msisdn]


async def test_a_dnd_subscriber_never_gets_an_ad(h):
    dnd = DoNotDisturb(h.ledger, h.clock)
    for m in (LISTED, FREE):
        await h.add_profile(m, tenure_days=100, arpu_minor=100)  # standard: may borrow
    assert await dnd.add(LISTED, "ops", "regulator's list")
    assert not await dnd.add(LISTED, "ops", "again")  # listed once
    assert await dnd.add(STRANGER, "ops", "never seen by the node")
    for msisdn in (LISTED, FREE, STRANGER):
        for trigger in AdTrigger:
            h.clock.advance(hours=2)  # past the interval cap each time
            await h.ads.offer(msisdn, trigger)
    # Out of balance through the lending service, and a campaign to everyone eligible.
    await h.lending.out_of_balance("s1", 0, 1, LISTED, None, IN_A)
    campaigns = CampaignService(h.ledger, h.ads, h.policy, h.clock, send_rate_max_per_s=1000)
    row = await campaigns.create("ad_campaign", None, None, "tester")
    assert row.recipients == 2  # LISTED is in the audience: the ad decision suppresses him
    while await campaigns.drain_once():
        pass
    await h.ads.drain()
    assert ads_to(h, LISTED) == [] and ads_to(h, STRANGER) == []
    assert ads_to(h, FREE)  # the list is the only reason
    suppressed = [f for k, f in h.events.events if k == "ad_suppressed" and f["msisdn"] == LISTED]
    assert suppressed and {f["reason"] for f in suppressed} == {"do_not_disturb"}
    # Off the list: ads again.
    assert await dnd.remove(LISTED, "ops", "asked to hear offers")
    assert not await dnd.remove(LISTED, "ops", "twice")
    h.clock.advance(days=1)
    await h.ads.offer(LISTED, AdTrigger.LOW_BALANCE)
    assert len(ads_to(h, LISTED)) == 1
    audit = await h.ledger.read(lambda c: c.execute(
        "SELECT action, who FROM audit WHERE msisdn = ? ORDER BY created_at", (LISTED,)
    ).fetchall())
    assert [a for a, _ in audit if a.startswith("dnd")] == ["dnd_add", "dnd_remove"]


async def test_import_lists_every_good_line_and_reports_the_bad(h, tmp_path, monkeypatch):
    from extrabalance.service import dnd as dnd_module

    monkeypatch.setattr(dnd_module, "IMPORT_BATCH_ROWS", 2)  # several batches
    path = tmp_path / "dnd.csv"
    path.write_text("msisdn\n201001000001\n# a comment\n\n201001000002,extra column\n"
                    "not-a-number\n201001000001\n2010010000031234567\n201001000004\n")
    dnd = DoNotDisturb(h.ledger, h.clock)
    report = await dnd.import_file(path, "ntra-2026-12", "ops")
    assert (report.listed_new, report.already_listed, report.bad_lines) == (3, 1, 2)
    assert report.bad_examples[0] == "line 6: 'not-a-number'"
    page = await dnd.page("", 10)
    assert [m for m, *_ in page] == ["201001000001", "201001000002", "201001000004"]
    assert page[0][1:3] == ("ntra-2026-12", "ops")
    assert [m for m, *_ in await dnd.page("201001000001", 1)] == ["201001000002"]


def test_the_command_imports_then_lists(tmp_path, capsys):
    from extrabalance.cli import main
    from extrabalance.config import default_config_text

    db, config = tmp_path / "eb.db", tmp_path / "eb.toml"
    config.write_text(default_config_text().replace('path = "var/extrabalance.db"',
                                                    f'path = "{db}"'), encoding="utf-8")
    listing = tmp_path / "dnd.txt"
    listing.write_text("201001000002\n201001000001\n")
    assert main(["dnd", "import", str(listing), "--source", "ntra", "--who", "ops",
                 "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith(f"{listing}: listed 2 new, 0 already listed")
    listing.write_text("201001000001\nabc\n")
    assert main(["dnd", "import", str(listing), "--config", str(config)]) == 1  # a bad line
    capsys.readouterr()
    assert main(["dnd", "list", "--config", str(config)]) == 0
    rows = [line.split(",")[:3] for line in capsys.readouterr().out.splitlines()]
    assert rows == [["201001000001", "ntra", "ops"], ["201001000002", "ntra", "ops"]]
