"""CLI parsing of the simulators (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulators.in_node import (
    InNodeSpec,
    InSimulator,
    MsisdnRange,
    _console_command,
    build_in_parser,
    parse_node_arg,
    specs_from_config,
)
from simulators.smsc import build_smsc_parser

CONFIG = Path(__file__).resolve().parents[2] / "config" / "extrabalance.toml"


def test_node_argument() -> None:
    spec = parse_node_arg("in-b,in-b.example,example,3871,20105*;201060000000-201069999999", "::1")
    assert spec.name == "in-b" and spec.port == 3871 and spec.host == "::1"
    assert spec.owns("201050000001") and spec.owns("201069999999") and not spec.owns("2010")
    with pytest.raises(ValueError):
        parse_node_arg("in-b,in-b.example", "127.0.0.1")


def test_specs_from_the_node_config() -> None:
    specs, peer, node = specs_from_config(str(CONFIG), "127.0.0.1")
    assert [s.name for s in specs] == ["in-a", "in-b"]
    assert specs[0].port == 3870 and specs[0].owns("201000000001")
    assert specs[1].owns("201050000000")
    assert peer.port == 3868 and peer.origin_host == node["origin_host"]
    assert node["currency_numeric"] == 818


def test_parsers_accept_the_documented_flags() -> None:
    args = build_in_parser().parse_args(
        ["--node", "a,a.x,x,0,1*", "--drop", "0.1", "--result", "3004=0.2", "--delay-ms", "5",
         "--result-msisdn", "1000=5030", "--silent-watchdog", "--mqtt", "127.0.0.1:1883"]
    )
    assert args.drop == 0.1 and args.result == ["3004=0.2"] and args.silent_watchdog
    assert not args.reject_nonstandard
    assert build_in_parser().parse_args(["--reject-nonstandard"]).reject_nonstandard
    args = build_smsc_parser().parse_args(
        ["--port", "0", "--throttle", "0.5", "--dialog-id", "user_message_reference", "--receipts"]
    )
    assert build_smsc_parser().parse_args(
        ["--also-system-id", "eb-node-2", "--also-system-id", "eb-node-3"]
    ).also_system_id == ["eb-node-2", "eb-node-3"]
    assert build_in_parser().parse_args(
        ["--node-peer", "127.0.0.1:3868:eb1.x:x", "--node-peer", "127.0.0.1:3869:eb2.x:x"]
    ).node_peer == ["127.0.0.1:3868:eb1.x:x", "127.0.0.1:3869:eb2.x:x"]
    assert args.throttle == 0.5 and args.receipts and args.dialog_id == "user_message_reference"


async def test_console_commands() -> None:
    sim = InSimulator([InNodeSpec("a", "a.x", "x", ranges=(MsisdnRange(prefix="20"),))], None)
    assert await _console_command(sim, ["set", "201", "500"]) == "201: 500"
    assert await _console_command(sim, ["spend", "201", "200"]) == "spent 200; 201: 300"
    assert await _console_command(sim, ["drop", "0.5"]) == "ok"
    assert sim.faults("a").drop_share == 0.5
    assert await _console_command(sim, ["result", "3004", "0.25", "a"]) == "ok"
    assert sim.faults("a").result_share == {3004: 0.25}
    assert await _console_command(sim, ["force", "201", "5030"]) == "ok"
    assert sim.faults("a").result_msisdns == {"201": 5030}
    assert await _console_command(sim, ["clear"]) == "ok"
    assert sim.faults("a").drop_share == 0.0
    event = await _console_command(sim, ["recharge", "201", "100"])
    assert event.endswith("balance 400")
    assert "unknown" in await _console_command(sim, ["bogus"])
