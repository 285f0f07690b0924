"""The report's cohort line: what was recovered from the subscribers' airtime and what
an operator waived are two different amounts (a waiver is no repayment)."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, date, datetime

from extrabalance.ledger.db import migrate
from extrabalance.observability import EDR_FIELDS
from extrabalance.report import build_figures, render_markdown

DAY = date(2026, 1, 5)
STAMP = "2026-01-05T10:00:00.000000+00:00"


def test_cohort_separates_recovered_from_waived(tmp_path):
    (tmp_path / "edr-20260105.csv").write_text(",".join(EDR_FIELDS) + "\n")
    ledger = tmp_path / "ledger.db"
    conn = sqlite3.connect(ledger)
    migrate(conn)
    with conn:
        # 30.00 lent + 0.50 fee; 29.50 recovered by recharges, 1.00 waived by an operator.
        conn.execute(
            "INSERT INTO loans (loan_id, msisdn, tier_id, principal_minor, fee_minor,"
            " principal_repaid_minor, fee_repaid_minor, state, channel, created_at, updated_at)"
            " VALUES ('L1', '201000000001', 3, 3000, 50, 3000, 50, 'REPAID', 'ussd', ?, ?)",
            (STAMP, STAMP))
        conn.execute(
            "INSERT INTO audit (audit_id, msisdn, action, who, why, detail, created_at)"
            " VALUES ('A1', '201000000001', 'adjust', 'ops', 'goodwill', ?, ?)",
            (json.dumps({"kind": "waive", "amount_minor": 100,
                         "loans": [{"loan_id": "L1", "fee_minor": 0, "principal_minor": 100,
                                    "state": "REPAID"}]}), STAMP))
    conn.close()
    f = build_figures(DAY, tmp_path, ledger_path=ledger,
                      now=datetime(2026, 1, 6, tzinfo=UTC))
    assert f.cohort_due_minor == 3050
    assert f.cohort_repaid_minor == 2950 and f.cohort_waived_minor == 100
    text = render_markdown(f)
    assert "29.50 EGP recovered and 1.00 EGP waived" in text
