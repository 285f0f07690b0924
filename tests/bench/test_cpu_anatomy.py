"""bench.cpu_anatomy counts what a USSD loan costs; the counts are the machine's build,
so only their shape and the protocol figures (which do not depend on it) are checked."""

import json

import pytest

from bench import cpu_anatomy


def test_a_short_run_reports_counts_per_layer_and_owner(capsys):
    assert cpu_anatomy.main(["--loans", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loans"] == 3 and result["concurrency"] == 1
    calls = result["python_calls_per_loan"]
    node = calls["node"]
    # Every node layer of a loan did some work, and the parts add up to the total.
    for layer in ("smpp", "diameter", "adapters", "service", "ledger", "core", "asyncio"):
        assert node[layer] > 0, layer
    assert node["total"] == pytest.approx(
        sum(v for k, v in node.items() if k != "total"), abs=0.5)
    assert calls["simulators"]["simulators"] > 0
    # The driver's column is its own code only: the SMPP and Diameter work it causes
    # belongs to the simulators and the node.
    assert "smpp" not in calls.get("bench", {}) and "diameter" not in calls.get("bench", {})
    assert result["tasks_per_loan"]["node"] > 0 and result["futures_per_loan"]["node"] > 0
    assert result["syscall_methods_per_loan"]["node"]["send"] > 0
    assert result["loop_turns_per_loan"] > 0
    # The wire is the protocol's, whatever the machine: 3 MO + 4 MT with their resps,
    # a balance check and the credit on the IN.
    assert result["wire_per_loan"]["smpp_pdus"] == 14
    assert result["wire_per_loan"]["diameter_messages"] == 4
    assert result["protocol_minimum_per_loan"]["smpp_pdus"] == 14
    assert result["command"].startswith("python -m bench.cpu_anatomy")


def test_the_table_names_every_owner_and_the_protocol_minimum():
    result = {"loans": 2, "concurrency": 1,
              "python_calls_per_loan": {"node": {"smpp": 10.0, "total": 10.0},
                                        "loop": {"asyncio": 3.0, "total": 3.0}},
              "syscall_methods_per_loan": {"node": {"send": 9.0}}, "loop_turns_per_loan": 5.0,
              "tasks_per_loan": {"node": 1.0}, "futures_per_loan": {"node": 2.0},
              "blocks_kept_per_loan": 0.0, "gc_collections_per_loan": 0.0,
              "wire_per_loan": {"smpp_pdus": 14.0, "diameter_messages": 4.0},
              "protocol_minimum_per_loan": cpu_anatomy.PROTOCOL_MINIMUM,
              "strace": {"available": False, "why": "strace is not installed"}}
    table = cpu_anatomy.format_table(result)
    assert "node" in table and "loop" in table and "minimum 14" in table
    assert "strace is not installed" in table


@pytest.mark.parametrize("argv", [["--loans", "0"], ["--loans", "x"],
                                  ["--loans", str(cpu_anatomy.LOANS_MAX + 1)],
                                  ["--loans", "2", "--concurrency", "3"],
                                  ["--concurrency", "0"], ["--bogus"]])
def test_bad_arguments_are_refused_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cpu_anatomy.main(argv)
    assert exc.value.code == 2
    assert "--" in capsys.readouterr().err


def test_layers_follow_the_source_tree():
    assert cpu_anatomy.layer_of("/x/extrabalance/smpp/pdu.py") == "smpp"
    assert cpu_anatomy.layer_of("/x/extrabalance/ledger/writer.py") == "ledger"
    assert cpu_anatomy.layer_of("/x/extrabalance/node.py") == "node"
    assert cpu_anatomy.layer_of("/x/simulators/smsc.py") == "simulators"
    assert cpu_anatomy.layer_of("/usr/lib/python3.11/asyncio/events.py") == "asyncio"
    assert cpu_anatomy.layer_of("/v/site-packages/structlog/_base.py") == "logging"
    assert cpu_anatomy.layer_of("/v/site-packages/prometheus_client/metrics.py") == "prometheus"
    assert cpu_anatomy.layer_of("/usr/lib/python3.11/json/encoder.py") == "other"


def test_strace_and_callgrind_summaries_are_read():
    strace = (
        "% time     seconds  usecs/call     calls    errors syscall\n"
        "------ ----------- ----------- --------- --------- ----------------\n"
        " 40.00    0.000400           2       200           epoll_wait\n"
        " 10.00    0.000100           1       100        3 recvfrom\n"
        "------ ----------- ----------- --------- --------- ----------------\n"
        "100.00    0.001000           3       300         3 total\n")
    assert cpu_anatomy.parse_strace_summary(strace) == {"epoll_wait": 200, "recvfrom": 100}
    assert cpu_anatomy.parse_callgrind_total("events: Ir\nsummary: 123456\n") == 123456
    with pytest.raises(ValueError):
        cpu_anatomy.parse_callgrind_total("events: Ir\n")
