"""`bench.ledger_ops` runs and reports a figure per loan and per payback."""

from __future__ import annotations

import json

import pytest

from bench import ledger_ops


def test_a_short_run_prints_cpu_per_loan_and_payback(capsys: pytest.CaptureFixture[str]) -> None:
    assert ledger_ops.main(["--loans", "200", "--repeat", "1"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["loans"] == 200
    assert figures["cpu_us_per_loan_min"] > 0 and figures["cpu_us_per_payback_min"] > 0
