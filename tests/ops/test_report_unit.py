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


def test_a_file_of_an_earlier_schema_and_a_day_upgraded_mid_way_are_read(tmp_path):
    """Columns are only added at the end (bundle_kind, bundle_quantity): a header that is
    a prefix of the schema is an earlier release's; lines written after an upgrade that
    same day carry the new cells and are read by position."""
    from extrabalance.report import read_edrs

    old = EDR_FIELDS[: EDR_FIELDS.index("bundle_kind")]
    before = ",".join(str({"time": "2026-01-01T09:00:00.000Z", "kind": "loan", "msisdn": "1",
                           "amount_minor": 100}.get(n, "")) for n in old) + "\n"
    after = line(time="2026-01-01T10:00:00.000Z", kind="loan", msisdn="2", amount_minor=1000,
                 bundle_kind="data", bundle_quantity=524288000)
    path = tmp_path / "edr-20260101.csv"
    path.write_text(",".join(old) + "\n" + before + after)
    first, second = read_edrs(path)
    assert (first["amount_minor"], first["bundle_kind"], first["bundle_quantity"]) == ("100", "", "")
    assert (second["bundle_kind"], second["bundle_quantity"]) == ("data", "524288000")
    assert build_figures(date(2026, 1, 1), tmp_path).loans.principal_minor == 1100
    path.write_text(",".join(old) + "\n" + after.rstrip("\n") + ",extra\n")
    with pytest.raises(ReportError, match="more cells"):
        read_edrs(path)
