"""The benchmark runs and reports its three figures (speed is never asserted)."""

from bench.codecs_smpp import run


def test_bench_reports_figures() -> None:
    figures = run(0.05)
    assert set(figures) == {"smpp_ours_per_s", "smpp_smpplib_per_s", "smpp_ratio"}
    assert figures["smpp_ours_per_s"] > 0 and figures["smpp_smpplib_per_s"] > 0
