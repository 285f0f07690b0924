"""The idle-penalty benchmark runs and reports what it says (its figures are the
machine's, so only their shape is checked)."""

import json

import pytest

from bench import idle_penalty


def test_reports_cpu_per_event_paced_and_back_to_back(capsys):
    idle_penalty.main(["--seconds", "0.05", "--rounds", "2", "--rates", "100,400",
                       "--saturated-events", "20"])
    result = json.loads(capsys.readouterr().out)
    assert len(result["saturated_cpu_us_per_event"]) == 2
    assert set(result["paced_cpu_us_per_event"]) == {"100/s", "400/s"}
    assert all(len(v) == 2 for v in result["paced_cpu_us_per_event"].values())
    assert all(us >= 0 for us in result["saturated_cpu_us_per_event"])
    assert all(ratio >= 0 for ratio in result["ratio_to_saturated"].values())


@pytest.mark.parametrize("argv", [["--rates", "x"], ["--rates", "0"], ["--seconds", "0"],
                                  ["--saturated-events", "0"]])
def test_bad_arguments_are_refused_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        idle_penalty.main(argv)
    assert exc.value.code == 2
    assert "--" in capsys.readouterr().err
