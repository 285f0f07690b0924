"""A short end-to-end bench run (a few seconds, low rate) as a test: every process
separate, real sockets, and the ledger must match the IN simulator exactly.

Speed is not asserted here (benchmarks measure, tests check); only money is.

The node's clock is set (`run --clock-start`), so the outcome does not depend on the
hour the suite runs at: once at noon in the operator's timezone (ads are sent) and
once at 23:30 (inside the shipped quiet hours 22:00-08:00: every ad is suppressed
with the reason `quiet_hours`).
"""

from __future__ import annotations

import asyncio
from datetime import date, datetime, time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from extrabalance.mosquitto import find_mosquitto

pytestmark = pytest.mark.skipif(find_mosquitto() is None,
                                reason="needs mosquitto (make wire-tools installs it)")

CAIRO = ZoneInfo("Africa/Cairo")  # [node].timezone of the shipped config


def _cairo(hour: int, minute: int) -> str:
    # A fixed day: the test must not read the machine's clock either.
    return datetime.combine(date(2026, 1, 5), time(hour, minute), CAIRO).isoformat()


def _run(tmp_path: Path, clock_start: str) -> dict[str, Any]:
    from bench.e2e import E2eOptions, parse_mix, run_e2e

    options = E2eOptions(
        rate_per_s=60.0, duration_s=3.0, subscribers=300, concurrency_max=50,
        mix=parse_mix("ussd=4,sms=1,oob=1,recharge=3"), report_dir=tmp_path / "report",
        json_output=True, progress=False, arabic_share=0.0, settle_max_s=20.0,
        command="test", clock_start=clock_start,
    )
    result = asyncio.run(run_e2e(options))
    rec = result["reconciliation"]
    assert result["ledger_matches_in"], rec["details"]
    assert result["settled"]["settled"]
    # The run did lend and recover: the check above was not vacuous.
    assert rec["loans_granted"] > 0 and rec["in_credits"] == rec["loans_granted"]
    assert rec["recoveries_done"] > 0 and rec["in_debits"] >= rec["recoveries_done"]
    assert result["p99_ms"] is not None
    return result


def test_short_mixed_run_at_noon_ledger_matches_in_and_ads_sent(tmp_path: Path) -> None:
    result = _run(tmp_path, _cairo(12, 0))
    assert result["counts"]["ads"] > 0
    assert "quiet_hours" not in result["ads_suppressed"]
    for key in ("loans_per_s", "paybacks_per_s", "ads_per_s", "p50_ms", "p95_ms", "p99_ms"):
        assert key in result
    assert set(result["cpu_s"]) >= {"node", "in_sim", "smsc_sim"}
    # Both kinds ran, so both per-operation figures are there and flagged as overlapping.
    assert result["node_cpu_ms_per_loan"] > 0 and result["node_cpu_ms_per_payback"] > 0
    assert result["node_cpu_mixed"] is True
    assert (tmp_path / "report" / "report.md").exists()
    assert (tmp_path / "report" / "latency.png").exists()


def test_short_mixed_run_at_night_ads_suppressed_by_quiet_hours(tmp_path: Path) -> None:
    result = _run(tmp_path, _cairo(23, 30))
    assert result["counts"]["ads"] == 0
    assert result["ads_suppressed"].get("quiet_hours", 0) > 0
    edr = (tmp_path / "report" / "run" / "edr")
    lines = [line for path in edr.glob("edr-*.csv") for line in path.read_text().splitlines()]
    assert any(",ad_suppressed," in line and ",quiet_hours," in line for line in lines)


def test_node_cpu_per_operation_divides_by_the_kind_done() -> None:
    from bench.e2e import node_cpu_per_operation

    loans_only = node_cpu_per_operation(2.0, {"loans": 1000, "paybacks": 0})
    assert loans_only == {"node_cpu_ms_per_loan": 2.0, "node_cpu_ms_per_payback": None,
                          "node_cpu_mixed": False}
    paybacks_only = node_cpu_per_operation(1.5, {"loans": 0, "paybacks": 3000})
    assert paybacks_only == {"node_cpu_ms_per_loan": None, "node_cpu_ms_per_payback": 0.5,
                             "node_cpu_mixed": False}
    assert node_cpu_per_operation(1.0, {"loans": 10, "paybacks": 10})["node_cpu_mixed"]
