"""After the demo story: every EDR line agrees with the ledger, and the daily report
built from those EDRs (and the ledger) states the ledger's figures."""

from __future__ import annotations

import csv
import json
from datetime import date, datetime

import pytest
import pytest_asyncio

from extrabalance import cli
from extrabalance.demo import A, B, Transcript, demo_env, play
from extrabalance.observability import EDR_FIELDS
from extrabalance.report import build_figures, write_report
from tests.ops.support import write_config

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def demo_run(tmp_path_factory):
    """The story played to the end and the node stopped (EDRs flushed, ledger closed)."""
    workdir = tmp_path_factory.mktemp("ops-demo")
    async with demo_env(workdir) as env:
        await play(env, Transcript())
        edr_dir, settings = env.node.edr.directory, env.settings
    return workdir / "extrabalance.db", edr_dir, settings


def ledger_rows(db_path, sql, *args):
    import sqlite3

    conn = sqlite3.connect(db_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def edr_lines(edr_dir):
    rows = []
    for path in sorted(edr_dir.glob("edr-*.csv")):
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            assert tuple(reader.fieldnames) == EDR_FIELDS
            rows += list(reader)
    return rows


async def test_every_loan_and_payback_edr_matches_the_ledger(demo_run):
    db_path, edr_dir, _ = demo_run
    rows = edr_lines(edr_dir)
    loans = {r["loan_id"]: r for r in ledger_rows(
        db_path, "SELECT * FROM loans WHERE state NOT IN ('FAILED', 'REQUESTED')")}
    loan_edrs = [r for r in rows if r["kind"] in ("loan", "advance")]
    assert sorted(r["loan_id"] for r in loan_edrs) == sorted(loans)  # one line per loan
    for r in loan_edrs:
        loan = loans[r["loan_id"]]
        assert r["msisdn"] == loan["msisdn"]
        assert int(r["tier_id"]) == loan["tier_id"]
        assert int(r["amount_minor"]) == loan["principal_minor"]
        assert int(r["fee_minor"]) == loan["fee_minor"]
        assert r["channel"] == loan["channel"]
    recoveries = {r["recovery_id"]: r for r in ledger_rows(
        db_path, "SELECT * FROM recoveries WHERE state = 'DONE'")}
    payback_edrs = [r for r in rows if r["kind"] == "payback"]
    assert sorted(r["recovery_id"] for r in payback_edrs) == sorted(recoveries)
    for r in payback_edrs:
        assert int(r["recovered_minor"]) == recoveries[r["recovery_id"]]["recovered_minor"]
        assert r["msisdn"] == recoveries[r["recovery_id"]]["msisdn"]
        # The recharge that paid: joins the EDR to the IN's own record of it.
        assert r["event_id"] == recoveries[r["recovery_id"]]["event_id"] != ""
        assert r["in_node"] == recoveries[r["recovery_id"]]["in_node"] != ""
        assert r["debt_after_minor"] != ""
    # Every line's time is UTC ISO-8601 and its kind is a known one.
    for r in rows:
        assert r["time"].endswith("Z") and datetime.fromisoformat(r["time"])
        assert r["node"] == "eb-node-1"
    # Refusals at the USSD menu are recorded like those of a borrow (SMS, auto).
    assert [(r["msisdn"], r["channel"], r["reason"]) for r in rows if r["kind"] == "refusal"] == [
        (A, "auto", "NOT_OPTED_IN"), (B, "ussd", "CEILING_REACHED"),
        (B, "ussd", "BARRED_BAD_DEBT"), (B, "auto", "BARRED_BAD_DEBT")]


def the_day(edr_dir) -> date:
    files = sorted(edr_dir.glob("edr-*.csv"))
    if len(files) != 1:
        pytest.skip("the demo ran across UTC midnight")
    return datetime.strptime(files[0].stem[4:], "%Y%m%d").date()


async def test_report_figures_match_the_ledger(demo_run, tmp_path):
    db_path, edr_dir, settings = demo_run
    day = the_day(edr_dir)
    f = build_figures(day, edr_dir, ledger_path=db_path, settings=settings)
    loans = ledger_rows(db_path, "SELECT tier_id, principal_minor, fee_minor, channel, msisdn"
                                 " FROM loans WHERE state NOT IN ('FAILED', 'REQUESTED')")
    assert f.loans.count == len(loans) == 6  # with the demo's data bundle
    assert f.loans.principal_minor == sum(x["principal_minor"] for x in loans) == 2200
    assert f.loans.fee_minor == sum(x["fee_minor"] for x in loans) == 230
    by_tier = {}
    for x in loans:
        n, p, fee = by_tier.get(str(x["tier_id"]), (0, 0, 0))
        by_tier[str(x["tier_id"])] = (n + 1, p + x["principal_minor"], fee + x["fee_minor"])
    assert {k: (v.count, v.principal_minor, v.fee_minor)
            for k, v in f.loans_by_tier.items()} == by_tier
    assert {k: v.count for k, v in f.loans_by_channel.items()} == {"ussd": 3, "sms": 2,
                                                                    "auto": 1}
    # A and C (400 days, ARPU 50.00) are "regular"; B (120 days) is "basic".
    assert {k: v.count for k, v in f.loans_by_segment.items()} == {"regular": 3, "basic": 3}
    recovered = ledger_rows(db_path, "SELECT SUM(recovered_minor) AS s FROM recoveries")[0]["s"]
    assert f.paybacks == 2 and f.recovered_minor == recovered == 550
    assert f.cohort_due_minor == 2430 and f.cohort_repaid_minor == 550
    assert f.cohort_waived_minor == 0
    assert f.cohort_recovery_rate == round(550 / 2430, 4)
    assert f.cohort_repaid_loans == 1 and f.payback_median_s is not None
    assert f.refusals_by_reason == {"BARRED_BAD_DEBT": 2, "CEILING_REACHED": 1,
                                    "NOT_OPTED_IN": 1}
    assert f.ads_sent == 1 and f.ads_followed_by_loan_24h == 1  # A borrowed after his ad
    assert f.ageing[0] == {"days": "0-7", "loans": 5, "owed_minor": 1880}
    assert sum(b["owed_minor"] for b in f.ageing) == 1880

    path = write_report(f, tmp_path / "out")
    text = path.read_text()
    assert "6 loans, 22.00 EGP lent, 2.30 EGP in fees." in text
    assert "| NOT_OPTED_IN | 1 |" in text and "cohort recovery rate 22.6 %" in text
    for plot in ("loans_by_hour.png", "refusals.png", "ageing.png", "time_to_payback.png"):
        assert (tmp_path / "out" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{plot}]({plot})" in text
    assert json.loads((tmp_path / "out" / "figures.json").read_text())["loans"]["count"] == 6


async def test_report_command_end_to_end(demo_run, tmp_path, capsys):
    _db_path, edr_dir, _ = demo_run
    day = the_day(edr_dir)
    config = write_config(tmp_path)
    out = tmp_path / "rep"
    assert cli.main(["report", "--date", day.isoformat(), "--edr-dir", str(edr_dir),
                     "--out", str(out), "--config", str(config), "--no-ledger"]) == 0
    text = (out / "report.md").read_text()
    assert "6 loans" in text and "Ageing" not in text  # EDRs only
    assert cli.main(["report", "--date", "1999-01-01", "--edr-dir", str(edr_dir),
                     "--config", str(config)]) == 1
    assert cli.main(["report", "--date", "yesterday", "--config", str(config)]) == 2
    capsys.readouterr()
