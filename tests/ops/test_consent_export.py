"""`extrabalance consent export MSISDN`: the subscriber's consent trail from the
ledger, as CSV or JSON, the same lines as the admin API's."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

from extrabalance.config import load_settings
from extrabalance.consent_cli import consent_export_command
from extrabalance.core.protection import resolve
from tests.core.sample import POLICY
from tests.service.fakes import Harness

M = "201001234567"


async def _trail(db: Path) -> None:
    h = Harness(db, replace(POLICY, protection=resolve("eg-ntra", {})))
    try:
        await h.add_profile(M)
        await h.lending.sms_loan(M, 3, "sms:k1")
        await h.lending.confirm_by_reply(M)
        await h.lending.borrow(M, 99, "ussd", "k2")  # no such tier: refused
    finally:
        await h.close()


def test_export_as_csv_and_json(tmp_path):
    import asyncio

    db = tmp_path / "ledger.db"
    asyncio.run(_trail(db))
    settings = load_settings(overrides={"storage": {"path": str(db)}})
    out = io.StringIO()
    assert consent_export_command(settings, M, out=out) == 0
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(r["action"], r["channel"]) for r in rows] == [
        ("loan_confirm_requested", "sms"), ("loan_consent", "sms"), ("loan_refused", "ussd")]
    assert json.loads(rows[1]["detail"])["fee_percent"] == "10%"
    assert json.loads(rows[2]["detail"])["reason"] == "UNKNOWN_TIER"
    out = io.StringIO()
    assert consent_export_command(settings, M, as_json=True, out=out) == 0
    assert [c["action"] for c in json.loads(out.getvalue())["consents"]] == [
        r["action"] for r in rows]
    assert consent_export_command(settings, "12ab", out=io.StringIO()) == 2
