"""A short chaos run (3 node SIGKILLs, IN disconnect, SMPP drop, broker restart and
kill, ~20 s of traffic) in the default suite: afterwards the ledger must equal what
the IN simulator applied, every acknowledged recharge accounted for once, no dialog
lent twice. The full run is `make chaos`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from extrabalance.mosquitto import find_mosquitto

pytestmark = pytest.mark.skipif(find_mosquitto() is None,
                                reason="needs mosquitto (make wire-tools installs it)")


def test_short_chaos_run_loses_and_doubles_nothing(tmp_path: Path) -> None:
    from bench.chaos import ChaosOptions, run_chaos

    options = ChaosOptions(kills=3, duration_s=12.0, rate_per_s=50.0, subscribers=400,
                           seed=11, in_disconnects=1, smpp_drops=1, broker_restarts=1,
                           broker_kills=1, report_dir=tmp_path, quiet_max_s=40.0)
    result = asyncio.run(run_chaos(options))
    rec = result.reconciliation
    assert result.faults["node_kill"] == 3
    assert sum(result.faults.values()) == 7
    assert rec["discrepancies"] == 0, rec["details"]
    assert result.settled["settled"], result.settled
    # Not vacuous: money moved both ways and recharges were checked.
    assert rec["loans_granted"] > 0 and rec["recoveries_done"] > 0
    assert rec["recharges_checked"] > 0
