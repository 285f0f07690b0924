"""A short chaos run with two nodes on one PostgreSQL ledger (bench/chaos.py with
--nodes 2 --storage postgresql): the second node SIGKILLed twice and restarted, then
SIGKILLed for good; the IN's links cut, the binds dropped, the broker restarted and
killed. The survivor carries the traffic and finishes what the dead node left: the
ledger must equal what the IN applied, every acknowledged recharge accounted for once.
The long run is `make chaos-cluster`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from extrabalance.mosquitto import find_mosquitto
from tests.pg import PG_DSN, admin_connection

pytestmark = pytest.mark.skipif(find_mosquitto() is None,
                                reason="needs mosquitto (make wire-tools installs it)")


def test_two_nodes_one_lost_for_good_lose_and_double_nothing(tmp_path: Path) -> None:
    from bench.chaos import ChaosOptions, run_chaos

    admin_connection().close()  # skips, saying why, when no server answers
    options = ChaosOptions(kills=2, duration_s=12.0, rate_per_s=40.0, subscribers=400,
                           seed=11, in_disconnects=1, smpp_drops=1, broker_restarts=1,
                           broker_kills=1, report_dir=tmp_path, quiet_max_s=40.0,
                           nodes=2, storage="postgresql", pg_dsn=PG_DSN, saga_lease_s=6.0)
    result = asyncio.run(run_chaos(options))
    rec = result.reconciliation
    assert result.faults["node_kill"] == 2 and result.faults["node_lost"] == 1
    assert result.nodes["lost"] == ["node2"]
    # The survivor stopped cleanly; the lost node's exit is its SIGKILL.
    assert result.nodes["exit_codes"][0] == 0 and result.nodes["exit_codes"][1] < 0
    kills = [what for _at, kind, what in result.fault_log if kind == "node_kill"]
    assert all(what.startswith("node2:") for what in kills)  # node 1 is the survivor
    assert rec["discrepancies"] == 0, rec["details"]
    assert result.settled["settled"], result.settled
    assert rec["loans_granted"] > 0 and rec["recoveries_done"] > 0
    assert rec["recharges_checked"] > 0


def test_with_several_nodes_the_kills_come_before_the_loss() -> None:
    from bench.chaos import LOST_AT_SHARE, ChaosOptions, plan

    for seed in range(20):
        events = plan(ChaosOptions(kills=10, duration_s=100.0, seed=seed, nodes=2,
                                   storage="postgresql"))
        kills = [at for at, kind in events if kind == "node_kill"]
        assert [kind for _at, kind in events].count("node_lost") == 1
        assert len(kills) == 10 and max(kills) < LOST_AT_SHARE * 100.0
    one = plan(ChaosOptions(kills=10, duration_s=100.0, seed=1))
    assert "node_lost" not in [kind for _at, kind in one]


def test_postgresql_restarts_are_planned_only_on_a_server_of_the_runs_own() -> None:
    from bench.chaos import ChaosOptions, plan

    own = [kind for _at, kind in plan(ChaosOptions(kills=4, duration_s=60.0, nodes=2,
                                                   storage="postgresql"))]
    assert own.count("pg_restart") == 1 and own.count("pg_crash") == 1
    given = [kind for _at, kind in plan(ChaosOptions(
        kills=4, duration_s=60.0, nodes=2, storage="postgresql", pg_dsn=PG_DSN))]
    assert "pg_restart" not in given and "pg_crash" not in given
    # the faults drawn before the restarts were added fall where they did
    assert [k for k in own if not k.startswith("pg_")] == given
