"""bench.profile_layers: a sample is charged to the node's frame nearest the top."""

from __future__ import annotations

from bench.profile_layers import layer_of, main, tally

LOOP = ("<module> (extrabalance/__main__.py:3);main (extrabalance/cli.py:428);"
        "run_node (extrabalance/node.py:509);Runner.run (asyncio/runners.py:118)")


def test_the_innermost_frame_of_the_node_names_the_layer():
    stack = (f"{LOOP};_step (extrabalance/service/lending.py:410);"
             "write (extrabalance/ledger/writer.py:120);execute (sqlite3/dbapi2.py:1)")
    assert layer_of(stack) == "ledger"
    assert layer_of(f"{LOOP};data_received (extrabalance/smpp/aio/connection.py:80)") == "SMPP"
    assert layer_of(f"{LOOP};_read_ready (asyncio/selector_events.py:800)") == "asyncio"
    assert layer_of(LOOP) == "asyncio"  # uvloop's own C code, under the entry frames
    assert layer_of("thread_main (threading.py:1)") == "other"


def test_counts_add_up_and_scale_to_microseconds(tmp_path, capsys):
    path = tmp_path / "node.txt"
    path.write_text(
        f"{LOOP};on_ccr (extrabalance/adapters/gy_server.py:200) 30\n"
        f"{LOOP};parse_cca (extrabalance/diameter/gy.py:50) 10\n"
        f"{LOOP} 60\n", encoding="utf-8")
    assert tally(path.read_text().splitlines()) == {"adapters": 30, "Diameter": 10, "asyncio": 60}
    assert main([str(path), "--per-op-ms", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "asyncio" in out and "600 µs" in out and "300 µs" in out
    path.write_text("not a profile\n", encoding="utf-8")
    assert main([str(path)]) == 2
