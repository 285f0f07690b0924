"""A short end-to-end bench run (a few seconds, low rate) as a test: every process
separate, real sockets, and the ledger must match the IN simulator exactly.

Speed is not asserted here (benchmarks measure, tests check); only money is.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from extrabalance.mosquitto import find_mosquitto

pytestmark = pytest.mark.skipif(find_mosquitto() is None,
                                reason="needs mosquitto (make wire-tools installs it)")


def test_short_mixed_run_ledger_matches_in(tmp_path: Path) -> None:
    from bench.e2e import E2eOptions, parse_mix, run_e2e

    options = E2eOptions(
        rate_per_s=60.0, duration_s=3.0, subscribers=300, concurrency_max=50,
        mix=parse_mix("ussd=4,sms=1,oob=1,recharge=3"), report_dir=tmp_path / "report",
        json_output=True, progress=False, arabic_share=0.0, settle_max_s=20.0,
        command="test",
    )
    result = asyncio.run(run_e2e(options))
    rec = result["reconciliation"]
    assert result["ledger_matches_in"], rec["details"]
    assert result["settled"]["settled"]
    # The run did lend, recover and advertise: the check above was not vacuous.
    assert rec["loans_granted"] > 0 and rec["in_credits"] == rec["loans_granted"]
    assert rec["recoveries_done"] > 0 and rec["in_debits"] >= rec["recoveries_done"]
    assert result["counts"]["ads"] > 0
    assert result["p99_ms"] is not None
    for key in ("loans_per_s", "paybacks_per_s", "ads_per_s", "p50_ms", "p95_ms", "p99_ms"):
        assert key in result
    assert set(result["cpu_s"]) >= {"node", "in_sim", "smsc_sim"}
    assert (tmp_path / "report" / "report.md").exists()
    assert (tmp_path / "report" / "latency.png").exists()
