"""Two nodes on one PostgreSQL ledger, end to end for a few seconds (bench/e2e.py with
--nodes 2 --storage postgresql): every process separate, the IN dialling both nodes,
the SMSC spreading dialogs over both nodes' binds. Money is checked, not speed: the
ledger must match the IN exactly, and the run's schema must be gone afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from extrabalance.mosquitto import find_mosquitto
from tests.pg import PG_DSN, admin_connection

pytestmark = pytest.mark.skipif(find_mosquitto() is None,
                                reason="needs mosquitto (make wire-tools installs it)")


def test_two_nodes_on_postgresql_ledger_matches_in(tmp_path: Path) -> None:
    from bench.e2e import E2eOptions, parse_mix, run_e2e

    admin = admin_connection()  # skips, saying why, when no server answers
    options = E2eOptions(
        rate_per_s=40.0, duration_s=3.0, subscribers=300, concurrency_max=50,
        mix=parse_mix("ussd=4,sms=1,oob=1,recharge=3"), report_dir=tmp_path / "report",
        json_output=True, progress=False, arabic_share=0.0, settle_max_s=20.0,
        command="test", nodes=2, storage="postgresql", pg_dsn=PG_DSN, plot=False,
    )
    result = asyncio.run(run_e2e(options))
    rec = result["reconciliation"]
    assert result["ledger_matches_in"], rec["details"]
    assert result["settled"]["settled"]
    assert rec["loans_granted"] > 0 and rec["in_credits"] == rec["loans_granted"]
    assert result["nodes"] == 2 and result["node_exit_codes"] == [0, 0]
    # Both nodes worked, and the database server's CPU is counted per loan.
    per_loan = result["cpu_ms_per_loan"]
    assert per_loan["node1"] > 0 and per_loan["node2"] > 0 and per_loan["postgresql"] > 0
    assert result["cpu_ms_per_loan_system"] > per_loan["nodes"]
    schema = result["pg_schema"]
    assert schema and not admin.execute(
        "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    admin.close()


def test_several_nodes_need_the_postgresql_ledger() -> None:
    from bench.e2e import options_from_argv

    with pytest.raises(SystemExit, match="--storage postgresql"):
        options_from_argv(["--nodes", "2"], seconds=2.0, json_output=True)
    with pytest.raises(SystemExit, match="--nodes within"):
        options_from_argv(["--nodes", "0", "--storage", "postgresql"], seconds=2.0,
                          json_output=True)
    options = options_from_argv(["--nodes", "2", "--storage", "postgresql"], seconds=2.0,
                                json_output=True)
    assert (options.nodes, options.storage) == (2, "postgresql")


def test_each_node_gets_its_own_identity_and_the_one_ledger(tmp_path: Path) -> None:
    from bench.cluster import PgRun, cluster_node_config
    from bench.e2e import default_config

    base = default_config()
    pg = PgRun("postgresql://eb@db.example:5432/ledger", schema="eb_run_0123456789")
    docs = [cluster_node_config(base, index=i, nodes=2, workdir=tmp_path,
                                diameter_port=4000 + i, pg=pg, client_id="eb")
            for i in range(2)]
    hosts = [d["node"]["origin_host"] for d in docs]
    assert hosts == [f"node1.{base['node']['origin_host']}", f"node2.{base['node']['origin_host']}"]
    assert [d["diameter"]["listen_port"] for d in docs] == [4000, 4001]
    assert [d["mqtt"]["client_id"] for d in docs] == ["eb-1", "eb-2"]
    assert [d["node"]["name"] for d in docs] == ["eb-node-1", "eb-node-2"]  # sagas leased apart
    assert len({d["storage"]["edr_dir"] for d in docs}) == 2  # never a shared EDR directory
    assert {d["storage"]["backend"] for d in docs} == {"postgresql"}
    url = docs[1]["storage"]["url"]
    assert url.startswith("postgresql://eb@db.example:5432/ledger?options=")
    assert "search_path%3Deb_run_0123456789" in url and "application_name=eb-run-0123456789-node2" in url
    assert base["node"]["origin_host"] == hosts[0].split(".", 1)[1]  # the base is unchanged
    single = cluster_node_config(base, index=0, nodes=1, workdir=tmp_path, diameter_port=4000,
                                 pg=None, client_id="eb")
    assert single["node"]["origin_host"] == base["node"]["origin_host"]
    assert single["storage"]["backend"] == "sqlite"
