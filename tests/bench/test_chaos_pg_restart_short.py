"""A short chaos run whose only faults are PostgreSQL restarts (bench/chaos.py with
--storage postgresql and no --pg-url): a node process on a PostgreSQL cluster of the
run's own (initdb/pg_ctl on a free loopback port), the server stopped fast and then
crashed under the node's mixed traffic (USSD, SMS, out-of-balance CCRs, recharges over
MQTT). The node stays up and the ledger must equal what the IN applied, every
acknowledged recharge accounted for once. The long run with every other fault too is
`make chaos-cluster`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from extrabalance.mosquitto import find_mosquitto

# About 45 s (a cluster of its own, a node, the simulators, two restarts, the quiet
# period): `make soak` / `make test-all` run it; the default suite has the 15-second
# tests/reliability/test_postgres_restart.py.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(find_mosquitto() is None,
                                 reason="needs mosquitto (make wire-tools installs it)")]


def test_node_rides_through_postgresql_restarts(tmp_path: Path) -> None:
    from bench.chaos import ChaosOptions, run_chaos
    from bench.pg_server import PgServerUnavailable, find_bin_dir

    try:
        find_bin_dir()
    except PgServerUnavailable as exc:
        pytest.skip(f"cannot start a PostgreSQL cluster of the test's own: {exc}")
    options = ChaosOptions(kills=0, duration_s=10.0, rate_per_s=40.0, subscribers=400,
                           seed=5, in_disconnects=0, smpp_drops=0, broker_restarts=0,
                           broker_kills=0, report_dir=tmp_path, quiet_max_s=40.0,
                           storage="postgresql", pg_restarts=1, pg_crashes=1, pg_down_s=1.0)
    result = asyncio.run(run_chaos(options))
    rec = result.reconciliation
    assert dict(result.faults) == {"pg_restart": 1, "pg_crash": 1}
    assert all("up again" in what for _at, _kind, what in result.fault_log)
    assert result.nodes["died_during_traffic"] == []  # up all along
    assert result.nodes["exit_codes"] == [0]  # and stopped cleanly at the end
    assert rec["discrepancies"] == 0, rec["details"]
    assert result.settled["settled"], result.settled
    assert rec["loans_granted"] > 0 and rec["recoveries_done"] > 0
    assert rec["recharges_checked"] > 0
