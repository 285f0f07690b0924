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
