"""The capacity search of `extrabalance bench e2e --capacity`: its stopping rule, on
stand-in runs (the real runs are tests/bench/test_e2e_short.py's)."""

from __future__ import annotations

import pytest

from bench import e2e


def fake_runs(monkeypatch, p99_by_rate, *, matches=True, late=None):
    asked = []

    async def run_e2e(options):
        rate = options.rate_per_s
        asked.append(rate)
        return {"operations": rate * 10, "traffic_s": 10.0, "p99_ms": p99_by_rate[rate],
                "p50_ms": 5.0, "p95_ms": 9.0, "loans_per_s": rate, "ussd_loans_per_s": rate,
                "paybacks_per_s": 0.0, "cpu_s": {"node": 1.0},
                "late_starts": (late or {}).get(rate, 0),
                "ledger_matches_in": matches, "report_dir": str(options.report_dir)}

    monkeypatch.setattr(e2e, "run_e2e", run_e2e)
    return asked


async def test_stops_at_the_first_rate_past_the_target(monkeypatch, tmp_path):
    asked = fake_runs(monkeypatch, {100.0: 20.0, 200.0: 45.0, 400.0: 80.0, 800.0: 300.0})
    options = e2e.E2eOptions(report_dir=tmp_path, json_output=True)
    result = await e2e.run_capacity(options, [100.0, 200.0, 400.0, 800.0], 50.0)
    assert asked == [100.0, 200.0, 400.0]
    assert result["max_rate_within_target_per_s"] == 200.0
    assert [r["within_target"] for r in result["capacity"]] == [True, True, False]
    assert result["ledger_matches_in"]


async def test_a_few_late_starts_are_jitter(monkeypatch, tmp_path):
    asked = fake_runs(monkeypatch, {100.0: 20.0, 200.0: 30.0}, late={200.0: 10})  # of 2,000
    result = await e2e.run_capacity(e2e.E2eOptions(report_dir=tmp_path, json_output=True),
                                    [100.0, 200.0], 50.0)
    assert asked == [100.0, 200.0] and result["max_rate_within_target_per_s"] == 200.0


async def test_a_rate_the_generator_could_not_keep_is_not_carried(monkeypatch, tmp_path):
    fake_runs(monkeypatch, {100.0: 20.0, 200.0: 30.0}, late={200.0: 200})
    result = await e2e.run_capacity(e2e.E2eOptions(report_dir=tmp_path, json_output=True),
                                    [100.0, 200.0], 50.0)
    assert result["max_rate_within_target_per_s"] == 100.0


async def test_books_that_do_not_balance_fail_the_search(monkeypatch, tmp_path):
    fake_runs(monkeypatch, {100.0: 20.0}, matches=False)
    result = await e2e.run_capacity(e2e.E2eOptions(report_dir=tmp_path, json_output=True),
                                    [100.0], 50.0)
    assert result["max_rate_within_target_per_s"] is None
    assert result["ledger_matches_in"] is False


def capacity_of(argv):
    return e2e.options_from_argv(argv, seconds=2.0, json_output=True).capacity


def test_rates_are_parsed_and_sorted():
    assert capacity_of(["--capacity", "400,100, 200"]) == ([100.0, 200.0, 400.0], 50.0)
    assert capacity_of(["--capacity", "100", "--p99-target", "80"]) == ([100.0], 80.0)
    assert capacity_of(["--rate", "100"]) is None
    with pytest.raises(SystemExit):
        capacity_of(["--capacity", "fast"])
    with pytest.raises(SystemExit):
        capacity_of(["--capacity", "100", "--max"])


def test_in_fault_and_extension_options_are_parsed() -> None:
    from bench import e2e

    options = e2e.options_from_argv(
        ["--in-drop", "0.1", "--in-result", "3004=0.2", "--opt-in-share", "1"],
        seconds=2.0, json_output=True)
    assert options.in_faults == {"drop_share": 0.1, "result_share": {"3004": 0.2}}
    assert options.opt_in_share == 1.0 and not options.advance_confirmation
    assert e2e.options_from_argv(["--advance-confirmation"], seconds=2.0,
                                 json_output=True).advance_confirmation
    assert e2e.options_from_argv([], seconds=2.0, json_output=True).in_faults == {}
    with pytest.raises(SystemExit):
        e2e.options_from_argv(["--in-result", "3004"], seconds=2.0, json_output=True)
