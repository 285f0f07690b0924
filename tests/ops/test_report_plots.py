"""The report's plots: counts on whole-number ticks, histogram bars with edges."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from extrabalance.report import ReportFigures, _plots


def test_counts_are_integers_and_bins_have_edges(tmp_path, monkeypatch) -> None:
    figures = {}
    close = plt.close

    def keep(fig):
        figures[fig.axes[0].get_title()] = fig

    monkeypatch.setattr(plt, "close", keep)
    f = ReportFigures(day="2026-01-05", edr_files=[], edr_lines=0, currency="EGP",
                      currency_exponent=2)
    f.refusals_by_reason = {"TENURE_TOO_SHORT": 3, "BARRED_BAD_DEBT": 1}
    f.loans_by_hour = {"ussd": {9: 1, 10: 2}}
    f.payback_seconds = [2.0, 3.5, 40.0, 41.0]
    try:
        _plots(f, tmp_path)
        refusals = figures["Refusals by reason"].axes[0]
        ticks = [t for t in refusals.get_xticks() if 0 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        hist = figures["Time to full payback, loans of the day"].axes[0]
        assert all(float(t).is_integer() for t in hist.get_yticks())
        bars = [p for p in hist.patches if p.get_height() > 0]
        assert len(bars) >= 2
        assert all(p.get_linewidth() > 0 and p.get_edgecolor()[3] > 0 for p in bars)
        assert hist.get_xlabel() == "seconds"
    finally:
        for fig in figures.values():
            close(fig)
