"""The daily report on hand-made EDR files."""

from __future__ import annotations

from datetime import date

import pytest

from extrabalance.observability import EDR_FIELDS
from extrabalance.report import ReportError, build_figures, render_markdown

HEADER = ",".join(EDR_FIELDS) + "\n"


def line(**fields):
    return ",".join(str(fields.get(name, "")) for name in EDR_FIELDS) + "\n"


def test_report_refuses_a_foreign_csv(tmp_path):
    (tmp_path / "edr-20260101.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match="EDR schema"):
        build_figures(date(2026, 1, 1), tmp_path)


def test_report_of_an_empty_day_renders(tmp_path):
    (tmp_path / "edr-20260101.csv").write_text(",".join(EDR_FIELDS) + "\n")
    f = build_figures(date(2026, 1, 1), tmp_path)
    assert f.loans.count == 0 and f.recovered_to_lent_ratio is None
    assert "0 loans" in render_markdown(f)


def test_ad_conversion_window_spans_into_the_next_day(tmp_path):
    (tmp_path / "edr-20260101.csv").write_text(
        HEADER
        + line(time="2026-01-01T23:00:00.000Z", node="n", kind="ad_sent", msisdn="1")
        + line(time="2026-01-01T10:00:00.000Z", node="n", kind="ad_sent", msisdn="2")
        + line(time="2026-01-01T09:00:00.000Z", node="n", kind="loan", msisdn="2",
               channel="ussd", tier_id=1, amount_minor=100, fee_minor=10))
    (tmp_path / "edr-20260102.csv").write_text(
        HEADER
        + line(time="2026-01-02T22:00:00.000Z", node="n", kind="loan", msisdn="1",
               channel="sms", tier_id=2, amount_minor=200, fee_minor=20)
        + line(time="2026-01-02T11:00:00.000Z", node="n", kind="loan", msisdn="2",
               channel="sms", tier_id=2, amount_minor=200, fee_minor=20))
    f = build_figures(date(2026, 1, 1), tmp_path)
    # Subscriber 1 borrowed 23 h after his ad (counts); 2 borrowed before his ad, and
    # again 25 h after it (does not count). Only the first day's loan is in the totals.
    assert f.ads_sent == 2 and f.ads_followed_by_loan_24h == 1
    assert (f.loans.count, f.loans.principal_minor, f.loans.fee_minor) == (1, 100, 10)
    assert f.loans_by_hour == {"ussd": {9: 1}}
