"""The ledger benchmark runs end to end on a small ledger, history included."""

from __future__ import annotations

import json

from bench import ledger as bench_ledger


def test_a_small_run_with_history(tmp_path, capsys):
    code = bench_ledger.main(["--subscribers", "2000", "--loans", "200", "--naive-loans", "20",
                              "--concurrency", "16", "--history", "3", "--no-reimport",
                              "--dir", str(tmp_path)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    history = result["history"]
    assert history["loans"] == 3 * history["subscribers"] and history["subscribers"] > 100
    assert result["import"]["rows"] == 2000 and result["import"]["bad_rows"] == 0
    assert result["loans_group_commit"]["loans"] == 200
    # Borrowers with a repaid past are not barred by it: every saga loan is granted.
    assert result["loans_service_saga"]["outcomes"] == {"GRANTED": 100}


def test_postgresql_side_by_side_with_sqlite(tmp_path, capsys):
    """`--storage postgresql`: the same loans on both ledgers in one run, CPU counted
    on the client and on the server's processes."""
    from tests.pg import PG_DSN, admin_connection

    admin_connection().close()  # skips, with the reason, when no server answers
    code = bench_ledger.main(["--subscribers", "2000", "--loans", "200", "--concurrency", "16",
                              "--no-reimport", "--storage", "postgresql", "--pg-pool", "4",
                              "--pg-dsn", PG_DSN, "--dir", str(tmp_path)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["postgresql_copy"]["verified"] and result["postgresql_copy"]["rows"] == 2000
    pg, lite = result["loans_postgresql"], result["loans_sqlite_group_commit"]
    assert pg["loans"] == lite["loans"] == 200
    assert pg["server_backends_counted"] >= 4 and pg["cpu_us_per_loan_server"] > 0
    assert pg["cpu_us_per_loan_total"] > pg["cpu_us_per_loan_client"]
