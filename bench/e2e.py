"""`extrabalance bench e2e`: the whole node under a mixed load, every part its own process.

What this file owns: the end-to-end benchmark. It starts a private Mosquitto, the IN
simulator and the SMSC / USSD gateway simulator (bench/netsim.py workers), imports
generated subscriber profiles into a fresh ledger, starts the node
(`python -m extrabalance run --config <generated toml>`), runs a mix of USSD loans
(menu and shortcut), SMS loans, out-of-balance CCRs and recharges at a target rate
(or as fast as it goes) for a duration, lets the node's resolver settle, stops the
node, and reconciles its ledger against what the IN applied (bench/reconcile.py).

Figures: loans/s, USSD loans/s, paybacks/s, ads/s, p50/p95/p99 of the USSD latency
(from the dial to the final screen, as the handset sees it), CPU seconds per process
(/proc/PID/stat), and whether the ledger matches the IN exactly. A Markdown report
with a latency plot is written to --report DIR (default var/bench/e2e-<time>).

    extrabalance bench e2e [--rate N | --max] [--duration S]
        [--mix ussd=5,sms=1,oob=1,recharge=3] [--subscribers N] [--json] [--report DIR]
        [--nodes N --storage postgresql]

Several nodes (docs/scale-out.md): `--nodes N --storage postgresql` starts N node
processes on one PostgreSQL ledger, a schema of the run's own (bench/cluster.py); the
IN simulator dials every node and the SMSC simulator spreads dialogs over every node's
binds. CPU per loan then counts the PostgreSQL server's processes too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import sqlite3
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cluster import (
    NODES_MAX,
    PgRun,
    PgServerCpu,
    cluster_node_config,
    ledger_reader,
    node_origin_host,
    pg_run,
    snapshot_to_sqlite,
)
from bench.procs import ProcessSet, cpu_seconds, dump_toml, free_port
from bench.reconcile import reconcile, settle_advances_with_in
from extrabalance.argparsing import Parser
from extrabalance.clock import SYSTEM_CLOCK

DEFAULT_MIX = "ussd=5,sms=1,oob=1,recharge=3"
MIX_KINDS = {"ussd": ("ussd_menu", "ussd_shortcut"), "sms": ("sms_loan",),
             "oob": ("out_of_balance",), "recharge": ("recharge",)}
SMSC_KINDS = ("ussd_menu", "ussd_shortcut", "sms_loan")
IN_KINDS = ("out_of_balance", "recharge")
SUBSCRIBERS_MAX = 1_000_000
CONNECT_TIMEOUT_S = 30.0  # node bound to the SMSC and connected to the IN nodes
SETTLE_MAX_S = 60.0  # after the traffic: every recharge consumed, every saga settled
# (without progress for this long: given up; see settle)
SETTLE_HARD_MAX_S = 900.0  # the settle phase's bound even while it makes progress
PROGRESS_EVERY_S = 0.25
OPT_IN_SHARE = 0.2  # subscribers opted in to automatic advances
SMPP_SYSTEM_ID = "extrabalance"
SMPP_PASSWORD_ENV = "EB_BENCH_SMPP_PASSWORD"


@dataclass
class E2eOptions:
    rate_per_s: float | None = 200.0  # None: as fast as the concurrency allows
    duration_s: float = 10.0
    mix: dict[str, float] = field(default_factory=lambda: parse_mix(DEFAULT_MIX))
    subscribers: int = 20_000
    concurrency_max: int = 400  # per simulator worker
    report_dir: Path | None = None
    json_output: bool = False
    progress: bool = True
    seed: int = 1
    log_level: str = "WARNING"
    settle_max_s: float = SETTLE_MAX_S
    arabic_share: float = 0.2  # subscribers whose profile language is Arabic
    profile_node: bool = False  # run the node under cProfile (report dir: node.prof)
    smpp: dict[str, Any] = field(default_factory=dict)  # binds, window_max, submit_rate_max_per_s
    delivery_receipts: bool = True  # [smpp] delivery_receipts of the node
    balance_check: bool = True  # [eligibility] check_balance_at_in of the node
    # A capacity search instead of one run: (rates ascending, p99 target ms).
    capacity: tuple[list[float], float] | None = None
    opt_in_share: float = OPT_IN_SHARE
    in_request_timeout_ms: int = 2000  # the IN's wait for the node's out-of-balance answer
    # The opt-in advance confirmation extension, on the node and the simulated IN
    # alike (off: the strict RFC 4006 IN, the default).
    advance_confirmation: bool = False
    # Faults of the simulated IN nodes: {"drop_share": 0.1, "result_share": {"3004": 0.1}}
    # (simulators.in_node.InFaults): answers lost after the operation was applied, 3004s.
    in_faults: dict[str, Any] = field(default_factory=dict)
    mqtt_inflight_max: int | None = None  # [mqtt] inflight_max and the broker's to match
    warmup_s: float = 0.0  # unmeasured traffic first (builds debt for paybacks)
    warmup_mix: dict[str, float] = field(default_factory=lambda: parse_mix("ussd=1"))
    plot: bool = True
    command: str = ""
    # ISO 8601 instant the node's clock starts at (`run --clock-start`): plays a chosen
    # hour of the day, e.g. inside or outside the ads' quiet hours. None: real time.
    clock_start: str | None = None
    # The SMSC simulator's gateway habits: repeat_share, submit_resp_delay_s (docs/smpp.md)
    gateway: dict[str, float] = field(default_factory=dict)
    nodes: int = 1  # node processes, on one ledger (several need storage "postgresql")
    storage: str = "sqlite"  # the nodes' ledger: "sqlite" (a file) or "postgresql"
    pg_dsn: str | None = None  # the PostgreSQL server (default $EB_BENCH_PG_DSN or local)
    # The nodes' [storage] saga_lease_s (None: the shipped 120 s). The resolver runs every
    # 30 s or every quarter of the lease, so a short lease also settles unknowns sooner.
    saga_lease_s: float | None = None


def parse_mix(text: str) -> dict[str, float]:
    """`ussd=5,sms=1,oob=1,recharge=3` → weights per traffic kind of simulators/traffic.py.

    `ussd` is split evenly between menu dialogs and `*123*N#` shortcuts; the traffic
    kinds themselves (`ussd_menu=2`) are accepted too.
    """
    weights = dict.fromkeys((*SMSC_KINDS, *IN_KINDS), 0.0)
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"--mix: {item!r} is not NAME=WEIGHT") from None
        if not sep or weight < 0:
            raise ValueError(f"--mix: {item!r} is not NAME=WEIGHT with WEIGHT >= 0")
        if name in MIX_KINDS:
            kinds = MIX_KINDS[name]
            for kind in kinds:
                weights[kind] += weight / len(kinds)
        elif name in weights:
            weights[name] += weight
        else:
            raise ValueError(f"--mix: unknown kind {name!r} (use {', '.join(MIX_KINDS)})")
    if sum(weights.values()) <= 0:
        raise ValueError("--mix has no positive weight")
    return weights


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="extrabalance bench e2e",
                                description="End-to-end benchmark over real sockets.")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, default=None,
                      help="operations per second, all kinds together (default 200)")
    rate.add_argument("--max", action="store_true", help="as fast as it goes")
    rate.add_argument("--capacity", default=None, metavar="RATES",
                      help="capacity search: one run per rate (comma-separated, operations/s)"
                           " in ascending order until p99 passes --p99-target")
    p.add_argument("--p99-target", type=float, default=50.0,
                   help="USSD p99 latency the capacity search holds to, ms (default 50)")
    p.add_argument("--duration", type=float, default=None, help="seconds of traffic (default 10)")
    p.add_argument("--mix", default=DEFAULT_MIX, help=f"default {DEFAULT_MIX}")
    p.add_argument("--subscribers", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=400,
                   help="operations in flight per simulator process")
    p.add_argument("--report", default=None, help="directory for the report (default var/bench)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log-level", default="WARNING", help="the node's log level (EB_LOG_LEVEL)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--binds", type=int, default=None,
                   help="SMPP binds of the node (default: the config's, 1)")
    p.add_argument("--window", type=int, default=None,
                   help="SMPP window per bind (default: the config's, 10)")
    p.add_argument("--submit-rate-max", type=float, default=None,
                   help="submit_sm per second per bind (default: the config's, 1000)")
    p.add_argument("--mqtt-inflight", type=int, default=None,
                   help="recharges the node handles at once ([mqtt] inflight_max, and the "
                        "broker's max_inflight_messages to match; default: the config's, 100)")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="seconds of unmeasured traffic first (default none)")
    p.add_argument("--warmup-mix", default="ussd=1",
                   help="mix of the warm-up (default ussd=1: subscribers get into debt)")
    p.add_argument("--profile-node", action="store_true",
                   help="run the node under cProfile; node.prof and its top functions in the report")
    p.add_argument("--no-delivery-receipts", action="store_true",
                   help="the node asks for no SMS delivery receipts ([smpp] delivery_receipts)")
    p.add_argument("--no-balance-check", action="store_true",
                   help="no CHECK_BALANCE before each loan ([eligibility] check_balance_at_in)")
    p.add_argument("--arabic-share", type=float, default=0.2,
                   help="share of subscribers with Arabic screens and SMS (default 0.2)")
    p.add_argument("--clock-start", default=None, metavar="ISO8601", type=_instant,
                   help="the node's clock starts at this instant (with its UTC offset) and "
                        "advances in real time, e.g. to play the ads' quiet hours")
    p.add_argument("--opt-in-share", type=float, default=OPT_IN_SHARE,
                   help=f"share of subscribers opted in to automatic advances (default {OPT_IN_SHARE})")
    p.add_argument("--in-drop", type=float, default=0.0, metavar="SHARE",
                   help="the simulated IN applies this share of the node's requests and"
                        " never answers them")
    p.add_argument("--in-result", action="append", default=[], metavar="CODE=SHARE",
                   help="the simulated IN answers this share with CODE (3002/3004: not"
                        " executed; 4010/4012/5030), repeatable")
    p.add_argument("--advance-confirmation", action="store_true",
                   help="opt-in extension on the node and the simulated IN alike; by default"
                        " the IN follows RFC 4006 alone and the CCA's grant is the credit")
    p.add_argument("--gateway-repeat", type=float, default=None, metavar="SHARE",
                   help="the SMSC repeats this share of USSD inputs and MO SMS (new sequence number)")
    p.add_argument("--gateway-resp-delay", type=float, default=None, metavar="S",
                   help="the SMSC answers every submit_sm this late")
    p.add_argument("--response-timeout", type=float, default=None, metavar="S",
                   help="the node's per-bind response_timeout_s")
    p.add_argument("--nodes", type=int, default=1,
                   help=f"node processes on one ledger (1..{NODES_MAX}; more than one needs"
                        " --storage postgresql): docs/scale-out.md")
    p.add_argument("--storage", choices=("sqlite", "postgresql"), default="sqlite",
                   help="the nodes' ledger; postgresql: a schema of the run's own on the"
                        " server at $EB_BENCH_PG_DSN (default the local one), dropped after")
    return p


def _instant(text: str) -> str:
    from extrabalance.clock import parse_instant

    try:
        return parse_instant(text).isoformat()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def options_from_argv(argv: list[str], *, seconds: float, json_output: bool) -> E2eOptions:
    args = build_parser().parse_args(argv)
    if args.duration is not None:
        duration = args.duration
    else:  # the dispatcher's --seconds (default 2) means "per case"; e2e wants longer
        duration = seconds if seconds > 2.0 else 10.0
    if not 0 < duration <= 3600:
        raise SystemExit("extrabalance bench e2e: --duration must be within 0..3600 s")
    if args.mqtt_inflight is not None and not 1 <= args.mqtt_inflight <= 65_535:
        raise SystemExit("extrabalance bench e2e: --mqtt-inflight within 1..65535")
    if not 1 <= args.subscribers <= SUBSCRIBERS_MAX:
        raise SystemExit(f"extrabalance bench e2e: --subscribers within 1..{SUBSCRIBERS_MAX}")
    try:
        mix = parse_mix(args.mix)
    except ValueError as exc:
        raise SystemExit(f"extrabalance bench e2e: {exc}") from None
    check_nodes(args.nodes, args.storage, "extrabalance bench e2e")
    return E2eOptions(
        rate_per_s=None if args.max else (args.rate if args.rate is not None else 200.0),
        duration_s=duration, mix=mix, subscribers=args.subscribers,
        concurrency_max=args.concurrency,
        report_dir=Path(args.report) if args.report else None,
        json_output=json_output or args.json, progress=not (json_output or args.json),
        seed=args.seed, log_level=args.log_level, plot=not args.no_plot,
        arabic_share=args.arabic_share, profile_node=args.profile_node,
        warmup_s=args.warmup, warmup_mix=parse_mix(args.warmup_mix),
        mqtt_inflight_max=args.mqtt_inflight,
        smpp={k: v for k, v in (("binds", args.binds), ("window_max", args.window),
                                ("submit_rate_max_per_s", args.submit_rate_max),
                                ("response_timeout_s", args.response_timeout))
              if v is not None},
        gateway={k: v for k, v in (("repeat_share", args.gateway_repeat),
                                   ("submit_resp_delay_s", args.gateway_resp_delay))
                 if v is not None},
        delivery_receipts=not args.no_delivery_receipts,
        balance_check=not args.no_balance_check,
        capacity=_capacity_search(args),
        clock_start=args.clock_start,
        opt_in_share=args.opt_in_share,
        advance_confirmation=args.advance_confirmation,
        in_faults=_in_faults(args),
        command="extrabalance bench e2e " + " ".join(argv),
        nodes=args.nodes,
        storage=args.storage,
    )


def check_nodes(nodes: int, storage: str, prog: str) -> None:
    if not 1 <= nodes <= NODES_MAX:
        raise SystemExit(f"{prog}: --nodes within 1..{NODES_MAX}")
    if nodes > 1 and storage != "postgresql":
        raise SystemExit(f"{prog}: --nodes {nodes} share one ledger: add --storage postgresql"
                         " (an SQLite ledger belongs to one node)")


def _in_faults(args: argparse.Namespace) -> dict[str, Any]:
    if not 0.0 <= args.in_drop <= 1.0:
        raise SystemExit("extrabalance bench e2e: --in-drop within 0..1")
    shares: dict[str, float] = {}
    for item in args.in_result:
        code, sep, share = item.partition("=")
        try:
            shares[str(int(code))] = float(share)
        except ValueError:
            raise SystemExit(f"extrabalance bench e2e: --in-result {item!r} is not CODE=SHARE"
                             ) from None
        if not sep:
            raise SystemExit(f"extrabalance bench e2e: --in-result {item!r} is not CODE=SHARE")
    return {"drop_share": args.in_drop, "result_share": shares} if args.in_drop or shares else {}


def _capacity_search(args: argparse.Namespace) -> tuple[list[float], float] | None:
    """(rates, p99 target ms) of a capacity search, or None for a single run."""
    if args.capacity is None:
        return None
    try:
        rates = sorted({float(r) for r in args.capacity.split(",") if r.strip()})
    except ValueError:
        raise SystemExit("extrabalance bench e2e: --capacity takes rates like 100,200,400") from None
    if not rates or rates[0] <= 0:
        raise SystemExit("extrabalance bench e2e: --capacity needs positive rates")
    if args.p99_target <= 0:
        raise SystemExit("extrabalance bench e2e: --p99-target must be positive")
    return rates, args.p99_target


def run_cli(argv: list[str], *, seconds: float, json_output: bool) -> dict[str, Any]:
    """Entry point of the `extrabalance bench e2e` dispatcher; returns the figures."""
    options = options_from_argv(argv, seconds=seconds, json_output=json_output)
    if options.capacity is not None:
        result = asyncio.run(run_capacity(options, *options.capacity))
        if not options.json_output:
            print_capacity(result)
        return result
    result = asyncio.run(run_e2e(options))
    if not options.json_output:
        print_summary(result)
    return result


# A rate the load generator could not keep (operations started late: a few are the
# scheduler's jitter, more say the generator or its slots are saturated) or the node did
# not serve (fewer operations done than asked) is not a rate the node carries.
CAPACITY_RATE_KEPT_SHARE = 0.95
CAPACITY_LATE_SHARE_MAX = 0.01


async def run_capacity(options: E2eOptions, rates: list[float],
                       p99_target_ms: float) -> dict[str, Any]:
    """The highest rate whose USSD p99 stays within `p99_target_ms` with the ledger
    matching the IN: one complete run (fresh ledger, processes, reconciliation) per
    rate, in ascending order, stopping at the first that fails."""
    stamp = SYSTEM_CLOCK.now().strftime("%Y%m%d-%H%M%S")
    base = options.report_dir or Path("var/bench") / f"e2e-capacity-{stamp}"
    rows: list[dict[str, Any]] = []
    best: float | None = None
    for rate in rates:
        run = await run_e2e(dataclasses.replace(
            options, rate_per_s=rate, report_dir=base / f"rate-{rate:g}", progress=False,
            plot=False))
        done_per_s = run["operations"] / run["traffic_s"] if run["traffic_s"] else 0.0
        p99 = run["p99_ms"]
        kept = (run["late_starts"] <= CAPACITY_LATE_SHARE_MAX * run["operations"]
                and done_per_s >= CAPACITY_RATE_KEPT_SHARE * rate)
        within = (p99 is not None and p99 <= p99_target_ms and kept
                  and run["ledger_matches_in"])
        rows.append({
            "rate_per_s": rate, "loans_per_s": run["loans_per_s"],
            "ussd_loans_per_s": run["ussd_loans_per_s"],
            "paybacks_per_s": run["paybacks_per_s"], "p50_ms": run["p50_ms"],
            "p95_ms": run["p95_ms"], "p99_ms": p99, "cpu_s": run["cpu_s"],
            "late_starts": run["late_starts"], "ledger_matches_in": run["ledger_matches_in"],
            "within_target": within, "report_dir": run["report_dir"],
        })
        if not options.json_output:
            print(f"rate {rate:g}/s: {run['loans_per_s']} loans/s, p99 {p99} ms, "
                  f"ledger = IN {run['ledger_matches_in']}: {'within' if within else 'OUT'}")
        if not within:
            break
        best = rate
    return {
        "command": options.command,
        "p99_target_ms": p99_target_ms,
        "max_rate_within_target_per_s": best,
        "capacity": rows,
        "ledger_matches_in": all(r["ledger_matches_in"] for r in rows),
        "report_dir": str(base),
    }


def print_capacity(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Capacity within p99 {result['p99_target_ms']:g} ms")
    for column in ("rate/s", "loans/s", "p50 ms", "p95 ms", "p99 ms", "CPU s node",
                   "ledger = IN", "within"):
        table.add_column(column)
    for r in result["capacity"]:
        table.add_row(f"{r['rate_per_s']:g}", str(r["loans_per_s"]), str(r["p50_ms"]),
                      str(r["p95_ms"]), str(r["p99_ms"]), str(r["cpu_s"].get("node")),
                      "yes" if r["ledger_matches_in"] else "NO",
                      "yes" if r["within_target"] else "no")
    console = Console()
    console.print(table)
    console.print(f"highest rate within the target: {result['max_rate_within_target_per_s']}")


# --- the run -----------------------------------------------------------------------------


def default_config() -> dict[str, Any]:
    from extrabalance.config import default_config_text

    return tomllib.loads(default_config_text())


def subscriber_msisdns(config: dict[str, Any], count: int) -> list[str]:
    """`count` MSISDNs spread over the IN nodes' ranges (first numbers of each range)."""
    nodes = config["in_nodes"]
    out: list[str] = []
    for i in range(count):
        node = nodes[i % len(nodes)]
        r = node["ranges"][0]
        n = i // len(nodes) + 1
        if "prefix" in r:
            out.append(r["prefix"] + str(n).zfill(12 - len(r["prefix"])))
        else:
            out.append(str(int(r["start"]) + n).zfill(len(r["start"])))
    return out


def write_profiles(path: Path, msisdns: list[str], seed: int, arabic_share: float = 0.2) -> None:
    """Tenure and ARPU so that the default segments are all used (vip, regular, basic)."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["msisdn", "tenure_days", "arpu_minor", "language"])
        for msisdn in msisdns:
            draw = rng.random()
            if draw < 0.1:
                tenure, arpu = rng.randint(730, 4000), rng.randint(20_000, 90_000)
            elif draw < 0.7:
                tenure, arpu = rng.randint(180, 700), rng.randint(3_000, 19_000)
            else:
                tenure, arpu = rng.randint(90, 170), rng.randint(100, 2_900)
            w.writerow([msisdn, tenure, arpu, "ar" if rng.random() < arabic_share else "en"])


def opt_in(db_path: Path, msisdns: list[str], share: float, seed: int) -> int:
    """Opt a share of subscribers in to automatic advances (before the node starts)."""
    rng = random.Random(seed + 1)
    chosen = [(m,) for m in msisdns if rng.random() < share]
    conn = sqlite3.connect(db_path)
    with conn:
        conn.executemany("UPDATE subscribers SET auto_advance_opt_in = 1 WHERE msisdn = ?", chosen)
    conn.close()
    return len(chosen)


def node_config(base: dict[str, Any], *, db_path: Path, diameter_port: int,
                in_ports: dict[str, int], smpp_port: int, mqtt_port: int,
                client_id: str = "extrabalance-bench",
                smpp: dict[str, Any] | None = None,
                delivery_receipts: bool = True, balance_check: bool = True,
                mqtt_inflight_max: int | None = None,
                advance_confirmation: bool = False) -> dict[str, Any]:
    doc = json.loads(json.dumps(base))  # deep copy
    doc["storage"]["path"] = str(db_path)
    doc["diameter"]["listen_port"] = diameter_port
    # The admin API on a free port: runs side by side (the suite's workers, the two
    # hours of `make test-hours`) would otherwise meet on the shipped 8080.
    doc["admin"]["listen_port"] = 0
    for node in doc["in_nodes"]:
        node["peers"] = [{"host": "127.0.0.1", "port": in_ports[node["name"]]}]
        node["advance_confirmation"] = advance_confirmation
    tuning = dict(smpp or {})
    binds = int(tuning.pop("binds", 1))
    bind = {**doc["smpp"]["binds"][0], "host": "127.0.0.1", "port": smpp_port,
            "system_id": SMPP_SYSTEM_ID, "password_env": SMPP_PASSWORD_ENV, **tuning}
    doc["smpp"]["binds"] = [dict(bind) for _ in range(binds)]
    doc["smpp"]["delivery_receipts"] = delivery_receipts
    doc["eligibility"]["check_balance_at_in"] = balance_check
    doc["mqtt"]["host"] = "127.0.0.1"
    doc["mqtt"]["port"] = mqtt_port
    doc["mqtt"]["client_id"] = client_id
    if mqtt_inflight_max is not None:
        doc["mqtt"]["inflight_max"] = mqtt_inflight_max
    return doc


def in_spec(base: dict[str, Any], diameter_port: int, mqtt_port: int, seed: int,
            request_timeout_ms: int = 2000, advance_confirmation: bool = False,
            in_faults: dict[str, Any] | None = None) -> dict[str, Any]:
    node = base["node"]
    return {
        "nodes": [
            {"name": n["name"], "origin_host": n["origin_host"], "realm": n["realm"],
             "ranges": [f"{r['prefix']}*" if "prefix" in r else f"{r['start']}-{r['end']}"
                        for r in n["ranges"]]}
            for n in base["in_nodes"]
        ],
        "node_peer": ["127.0.0.1", diameter_port, node["origin_host"], node["origin_realm"]],
        "mqtt": ["127.0.0.1", mqtt_port],
        "currency": node["currency"], "currency_numeric": node["currency_numeric"],
        "currency_exponent": node["currency_exponent"],
        "service_context_id": base["diameter"]["service_context_id"],
        "seed": seed,
        "request_timeout_ms": request_timeout_ms,
        "advance_confirmation": advance_confirmation,
        "faults": in_faults or {},
    }


@dataclass
class Network:
    """Everything one run started; `procs` owns the OS processes."""

    procs: ProcessSet
    workdir: Path
    broker: Any
    in_worker: Any
    smsc_worker: Any
    node: Any
    config_path: Path
    db_path: Path
    node_env: dict[str, str]
    msisdns: list[str]
    base: dict[str, Any]
    # Every node process (`node` is the first) and its config; the PostgreSQL run when
    # the ledger is on PostgreSQL (then `db_path` is the snapshot taken after the run).
    nodes: list[Any] = field(default_factory=list)
    config_paths: list[Path] = field(default_factory=list)
    pg: PgRun | None = None
    binds_per_node: int = 1

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes = [self.node]
            self.config_paths = [self.config_path]

    def reader(self) -> Any:
        """A read-only connection on the ledger the nodes use."""
        return ledger_reader(self.db_path, self.pg)

    async def stop_nodes(self) -> list[int | None]:
        """Stop every node (SIGTERM, then SIGKILL); for PostgreSQL, then copy the
        ledger into `db_path` for the reconciliation."""
        codes = [await node.stop() for node in self.nodes]
        if self.pg is not None:
            snapshot_to_sqlite(self.pg, self.db_path)
        return codes


@contextlib.asynccontextmanager
async def network(workdir: Path, *, subscribers: int, seed: int, log_level: str,
                  client_id: str = "extrabalance-bench", arabic_share: float = 0.2,
                  broker_config: tuple[str, ...] = (), profile_path: Path | None = None,
                  smpp: dict[str, Any] | None = None, opt_in_share: float = OPT_IN_SHARE,
                  in_request_timeout_ms: int = 2000, delivery_receipts: bool = True,
                  balance_check: bool = True,
                  mqtt_inflight_max: int | None = None,
                  clock_start: str | None = None,
                  advance_confirmation: bool = False,
                  in_faults: dict[str, Any] | None = None,
                  gateway: dict[str, float] | None = None,
                  nodes: int = 1, storage: str = "sqlite",
                  pg_dsn: str | None = None, saga_lease_s: float | None = None) -> Any:
    """Broker, IN worker, SMSC worker, profiles and the node(s); all stopped on exit.

    `mqtt_inflight_max` sets the node's [mqtt] inflight_max and the broker's
    max_inflight_messages together (the broker sends no more than its own).
    `nodes` > 1 (with `storage="postgresql"`): that many node processes on one ledger,
    a PostgreSQL schema of the run's own, created here and dropped on exit."""
    from extrabalance.ledger.profiles import import_profiles
    from extrabalance.mosquitto import BrokerUnavailable, MosquittoBroker

    if workdir.exists():
        # A ledger or broker state left by an earlier run would be reconciled against
        # this run's IN: every run starts from nothing.
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    try:
        if mqtt_inflight_max is not None:
            broker_config = (*broker_config, f"max_inflight_messages {mqtt_inflight_max}")
        broker = MosquittoBroker(workdir / "mosquitto", extra_config=broker_config).start()
    except BrokerUnavailable as exc:
        raise SystemExit(f"extrabalance bench: needs a private Mosquitto broker: {exc}. "
                         "Install it (apt-get install mosquitto; `make wire-tools` does it).")
    try:
        async with contextlib.AsyncExitStack() as stack:
            pg = stack.enter_context(pg_run(pg_dsn)) if storage == "postgresql" else None
            procs = await stack.enter_async_context(ProcessSet(workdir))
            base = default_config()
            diameter_ports = [free_port() for _ in range(nodes)]
            diameter_port = diameter_ports[0]
            spec = in_spec(base, diameter_port, broker.port, seed, in_request_timeout_ms,
                           advance_confirmation, in_faults)
            if nodes > 1:
                node = base["node"]
                spec["node_peers"] = [
                    ["127.0.0.1", port, node_origin_host(node["origin_host"], i, nodes),
                     node["origin_realm"]] for i, port in enumerate(diameter_ports)]
            in_worker = await procs.start_worker(
                "in-sim", ["--role", "in", "--spec", json.dumps(spec)])
            password = os.urandom(4).hex()  # SMPP passwords are at most 8 octets
            smsc_worker = await procs.start_worker(
                "smsc-sim", ["--role", "smsc", "--spec", json.dumps({
                    "system_id": SMPP_SYSTEM_ID, "password": password,
                    "short_code": base["smpp"]["short_code"], "seed": seed,
                    **(gateway or {})})])
            db_path = workdir / "extrabalance.db"
            msisdns = subscriber_msisdns(base, subscribers)
            profiles = workdir / "profiles.csv"
            write_profiles(profiles, msisdns, seed, arabic_share)
            report = import_profiles(db_path, profiles, progress=False)
            if report.bad_rows_total:
                raise RuntimeError(f"generated profiles rejected: {report.bad_rows[:5]}")
            opt_in(db_path, msisdns, opt_in_share, seed)
            config = node_config(base, db_path=db_path, diameter_port=diameter_port,
                                 in_ports=in_worker.ready["ports"],
                                 smpp_port=smsc_worker.ready["ports"]["smpp"],
                                 mqtt_port=broker.port, client_id=client_id, smpp=smpp,
                                 delivery_receipts=delivery_receipts, balance_check=balance_check,
                                 mqtt_inflight_max=mqtt_inflight_max,
                                 advance_confirmation=advance_confirmation)
            if pg is not None:
                pg.load(db_path)
            env = {SMPP_PASSWORD_ENV: password, "EB_LOG_LEVEL": log_level}
            started, config_paths = [], []
            for i in range(nodes):
                doc = cluster_node_config(config, index=i, nodes=nodes, workdir=workdir,
                                          diameter_port=diameter_ports[i], pg=pg,
                                          client_id=client_id, saga_lease_s=saga_lease_s)
                name = "node" if nodes == 1 else f"node{i + 1}"
                config_path = workdir / f"{name}.toml"
                config_path.write_text(dump_toml(doc), encoding="utf-8")
                config_paths.append(config_path)
                started.append(await procs.start_node(
                    config_path, env=env, name=name, clock_start=clock_start,
                    profile_path=None if profile_path is None
                    else profile_path.with_name(f"{name}.prof")))
            net = Network(procs, workdir, broker, in_worker, smsc_worker, started[0],
                          config_paths[0], db_path, env, msisdns, base, started, config_paths,
                          pg, len(config["smpp"]["binds"]))
            await wait_connected(net)
            yield net
    finally:
        broker.stop()


async def wait_connected(net: Network, timeout_s: float = CONNECT_TIMEOUT_S, *,
                         nodes_up: int | None = None) -> None:
    """Until the node is bound to the SMSC and every IN node reaches it; with several
    nodes, until `nodes_up` of them (default all) are bound and every one of them is
    reached by every IN node."""
    up = len(net.nodes) if nodes_up is None else nodes_up
    several = len(net.nodes) > 1
    try:
        await asyncio.gather(
            net.smsc_worker.call("wait_bound", timeout_s=timeout_s,
                                 binds=up * net.binds_per_node if several else 1),
            net.in_worker.call("wait_connected", timeout_s=timeout_s,
                               every_node=several and up == len(net.nodes)),
        )
    except (RuntimeError, TimeoutError) as exc:
        logs = "; ".join(f"{n.name} log: {n.log_tail()}" for n in net.nodes)
        raise RuntimeError(f"the node did not come up ({exc}); {logs}") from None


async def settle(net: Network, *, max_s: float) -> dict[str, Any]:
    """Wait until every published recharge reached the ledger and no saga is unsettled.

    Gives up after `max_s` without progress (a published recharge newly in the
    ledger, or a saga settled), and after `SETTLE_HARD_MAX_S` in any case: at --max the
    IN can publish recharges faster than the node takes them, and the broker's backlog
    may need longer than `max_s` to drain while the node is still working through it.
    """
    started = time.monotonic()
    stall_deadline = started + max_s
    hard_deadline = started + max(max_s, SETTLE_HARD_MAX_S)
    state: dict[str, Any] = {}
    best = (math.inf, math.inf)
    dump_path = net.workdir / "in-progress.json"
    while True:
        await net.in_worker.call("dump", path=str(dump_path))
        in_dump = json.loads(dump_path.read_text())
        published = set(in_dump["published_event_ids"])
        state = ledger_state(net, published)
        now = time.monotonic()
        state["elapsed_s"] = round(now - started, 2)
        if state["recharges_missing"] == 0 and state["unsettled"] == 0:
            state["settled"] = True
            return state
        if state["recharges_missing"] < best[0] or state["unsettled"] < best[1]:
            stall_deadline = now + max_s
        best = (min(best[0], state["recharges_missing"]), min(best[1], state["unsettled"]))
        if now > min(stall_deadline, hard_deadline) or not any(n.alive for n in net.nodes):
            state["settled"] = False
            return state
        await asyncio.sleep(0.5)


def ledger_state(net: Network, published: set[str]) -> dict[str, Any]:
    conn = net.reader()
    try:
        unsettled = conn.execute(
            "SELECT (SELECT COUNT(*) FROM loans"
            " WHERE state IN ('REQUESTED','CREDITING','UNKNOWN','CONFIRMING'))"
            " + (SELECT COUNT(*) FROM recoveries WHERE state IN ('RECOVERING','UNKNOWN'))"
        ).fetchone()[0]
        seen = {row[0][len("recharge:"):] for row in conn.execute(
            "SELECT key FROM idempotency WHERE key LIKE 'recharge:%'")}
        seen.update(row[0] for row in conn.execute("SELECT event_id FROM recoveries"))
    finally:
        conn.close()
    return {"unsettled": int(unsettled), "recharges_missing": len(published - seen)}


def split_rates(options: E2eOptions) -> tuple[dict[str, float], dict[str, float],
                                              float | None, float | None]:
    smsc_mix = {k: options.mix[k] for k in SMSC_KINDS}
    in_mix = {k: options.mix[k] for k in IN_KINDS}
    total = sum(options.mix.values())
    smsc_share, in_share = sum(smsc_mix.values()) / total, sum(in_mix.values()) / total
    if options.rate_per_s is None:
        return smsc_mix, in_mix, None, None
    return (smsc_mix, in_mix, options.rate_per_s * smsc_share or None,
            options.rate_per_s * in_share or None)


async def drive_traffic(net: Network, options: E2eOptions, *,
                        samples_path: Path) -> dict[str, Any]:
    """Start the mix in both workers, show progress, return both reports."""
    smsc_mix, in_mix, smsc_rate, in_rate = split_rates(options)
    common = {"duration_s": options.duration_s, "concurrency_max": options.concurrency_max}
    workers = []
    if sum(smsc_mix.values()) > 0:
        await net.smsc_worker.call("traffic_start", msisdns=net.msisdns, mix=smsc_mix,
                                   rate_per_s=smsc_rate, seed=options.seed, **common)
        workers.append(net.smsc_worker)
    if sum(in_mix.values()) > 0:
        await net.in_worker.call("traffic_start", msisdns=net.msisdns, mix=in_mix,
                                 rate_per_s=in_rate, seed=options.seed + 7, **common)
        workers.append(net.in_worker)
    started = time.monotonic()
    await show_progress(workers, options, started)
    reports: dict[str, Any] = {}
    for worker in workers:
        answer = await worker.call(
            "traffic_wait", samples_path=str(samples_path) if worker is net.smsc_worker else None)
        reports[worker.name] = answer["report"]
    return reports


async def show_progress(workers: list[Any], options: E2eOptions, started: float) -> None:
    """Poll the workers until their traffic is over; a rich progress bar unless --json."""
    progress = None
    task = None
    if options.progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("[bold]e2e[/bold] {task.description}"), BarColumn(),
                            TextColumn("{task.fields[ops]} ops, {task.fields[rate]}/s"),
                            TimeElapsedColumn(), transient=True)
        progress.start()
        task = progress.add_task("traffic", total=options.duration_s, ops=0, rate="0")
    try:
        deadline = started + options.duration_s + 90.0  # bounded even if a worker hangs
        while time.monotonic() < deadline:
            answers = [await w.call("progress") for w in workers]
            ops = sum(a["started"] for a in answers)
            elapsed = time.monotonic() - started
            if progress is not None and task is not None:
                progress.update(task, completed=min(elapsed, options.duration_s), ops=ops,
                                rate=f"{ops / elapsed:,.0f}" if elapsed else "0",
                                description="traffic" if elapsed < options.duration_s
                                else "draining")
            if all(a["done"] for a in answers):
                return
            await asyncio.sleep(PROGRESS_EVERY_S)
    finally:
        if progress is not None:
            progress.stop()


def count_edr(workdir: Path, kind: str) -> int:
    return sum(count_edr_reasons(workdir, kind).values())


def count_edr_reasons(workdir: Path, kind: str) -> dict[str, int]:
    """EDR lines of `kind`, counted by their `reason` column."""
    reasons: dict[str, int] = {}
    # `edr` beside a SQLite ledger; `edr-nodeN`, one per node, on PostgreSQL.
    for path in workdir.glob("edr*/edr-*.csv"):
        with path.open(encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("kind") == kind:
                    reason = row.get("reason") or ""
                    reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def node_cpu_per_operation(node_cpu_s: float, window: dict[str, int]) -> dict[str, Any]:
    """The node's CPU milliseconds per loan and per payback done in the window.

    Each figure charges all the node's CPU in the window to that one kind of operation,
    so it is the cost of one operation only when the mix holds that kind alone (`--mix
    ussd=1` for loans, `--mix recharge=1` for paybacks); `node_cpu_mixed` says when the
    window held both and the two figures overlap. None when no such operation was done.
    """
    loans, paybacks = window.get("loans", 0), window.get("paybacks", 0)
    return {
        "node_cpu_ms_per_loan": round(1000 * node_cpu_s / loans, 3) if loans else None,
        "node_cpu_ms_per_payback": round(1000 * node_cpu_s / paybacks, 3) if paybacks else None,
        "node_cpu_mixed": bool(loans and paybacks),
    }


def ledger_counts(db_path: Path, pg: PgRun | None = None) -> dict[str, int]:
    """What the ledger holds (the file at `db_path`, or the run's PostgreSQL schema)."""
    conn = ledger_reader(db_path, pg)
    try:
        granted = "('ACTIVE','PARTIALLY_REPAID','REPAID','WRITTEN_OFF')"
        q = lambda sql: int(conn.execute(sql).fetchone()[0])
        return {
            "loans": q(f"SELECT COUNT(*) FROM loans WHERE state IN {granted}"),
            "ussd_loans": q(f"SELECT COUNT(*) FROM loans WHERE state IN {granted}"
                            " AND channel = 'ussd'"),
            "sms_loans": q(f"SELECT COUNT(*) FROM loans WHERE state IN {granted}"
                           " AND channel = 'sms'"),
            "advances": q(f"SELECT COUNT(*) FROM loans WHERE state IN {granted}"
                          " AND channel = 'auto'"),
            "failed_loans": q("SELECT COUNT(*) FROM loans WHERE state = 'FAILED'"),
            "paybacks": q("SELECT COUNT(*) FROM recoveries WHERE state = 'DONE'"
                          " AND recovered_minor > 0"),
            "recharges": q("SELECT COUNT(*) FROM idempotency WHERE key LIKE 'recharge:%'"),
        }
    finally:
        conn.close()


async def run_e2e(options: E2eOptions) -> dict[str, Any]:
    from extrabalance.bench import machine

    stamp = SYSTEM_CLOCK.now().strftime("%Y%m%d-%H%M%S")
    report_dir = options.report_dir or Path("var/bench") / f"e2e-{stamp}"
    workdir = report_dir / "run"
    samples_path = workdir / "latency_ms.json"
    self_cpu0 = os.times()
    async with network(workdir, subscribers=options.subscribers, seed=options.seed,
                       log_level=options.log_level, arabic_share=options.arabic_share,
                       profile_path=(report_dir / "node.prof").resolve()
                       if options.profile_node else None, smpp=options.smpp,
                       opt_in_share=options.opt_in_share,
                       in_request_timeout_ms=options.in_request_timeout_ms,
                       delivery_receipts=options.delivery_receipts,
                       balance_check=options.balance_check,
                       mqtt_inflight_max=options.mqtt_inflight_max,
                       clock_start=options.clock_start,
                       advance_confirmation=options.advance_confirmation,
                       in_faults=options.in_faults,
                       gateway=options.gateway, nodes=options.nodes,
                       storage=options.storage, pg_dsn=options.pg_dsn,
                       saga_lease_s=options.saga_lease_s) as net:
        if options.warmup_s > 0:
            warm = dataclasses.replace(options, duration_s=options.warmup_s, mix=options.warmup_mix)
            await drive_traffic(net, warm, samples_path=workdir / "warmup_latency_ms.json")
            await settle(net, max_s=options.settle_max_s)
        counts0 = ledger_counts(net.db_path, net.pg)
        procs = {n.name: n for n in net.nodes}
        procs.update({"in_sim": net.in_worker, "smsc_sim": net.smsc_worker})
        broker_pid = net.broker._process.pid if net.broker._process is not None else None
        server_cpu = PgServerCpu(net.pg) if net.pg is not None else None
        cpu0 = {name: p.cpu_s() for name, p in procs.items()}
        cpu0["mosquitto"] = (cpu_seconds(broker_pid) or 0.0) if broker_pid else 0.0
        if server_cpu is not None:
            server_cpu.start()
        t0 = time.monotonic()
        reports = await drive_traffic(net, options, samples_path=samples_path)
        traffic_s = time.monotonic() - t0
        # What the node finished within the traffic window (the backlog it drains while
        # settling is not counted in the rates).
        window = {k: v - counts0[k] for k, v in ledger_counts(net.db_path, net.pg).items()}
        cpu1 = {name: p.cpu_s() for name, p in procs.items()}
        cpu1["mosquitto"] = (cpu_seconds(broker_pid) or 0.0) if broker_pid else 0.0
        if server_cpu is not None:
            cpu0["postgresql"], cpu1["postgresql"] = 0.0, server_cpu.seconds()
        settled = await settle(net, max_s=options.settle_max_s)
        node_exits = await net.stop_nodes()
        node_exit = next((code for code in node_exits if code), node_exits[0])
        in_dump_path, smsc_dump_path = workdir / "in-dump.json", workdir / "smsc-dump.json"
        await net.in_worker.call("dump", path=str(in_dump_path))
        await net.smsc_worker.call("dump", path=str(smsc_dump_path))
        await net.in_worker.call("quit")
        await net.smsc_worker.call("quit")
    self_cpu1 = os.times()
    in_dump = json.loads(in_dump_path.read_text())
    smsc_dump = json.loads(smsc_dump_path.read_text())
    # With an RFC-only IN, an advance whose every answer came too late for it is
    # settled from its records (reconcile-in), as an operator does; the extension
    # settles its own by confirmation.
    reversed_advances = ({} if options.advance_confirmation
                         else settle_advances_with_in(net.db_path, in_dump))
    rec = reconcile(net.db_path, in_dump, smsc_dump, check_recharges=True)
    if reversed_advances:
        rec.notes.append(f"reconcile-in reversed {sum(reversed_advances.values())} advances"
                         " the IN never applied")
    counts = ledger_counts(net.db_path)
    ads = count_edr(workdir, "ad_sent")
    ads_suppressed = count_edr_reasons(workdir, "ad_suppressed")
    smsc_report = reports.get("smsc-sim", {})
    latency = smsc_report.get("ussd_latency", {})
    duration = options.duration_s
    cpu = {name: round(cpu1[name] - cpu0[name], 2) for name in cpu0}
    cpu["bench"] = round((self_cpu1.user + self_cpu1.system)
                         - (self_cpu0.user + self_cpu0.system), 2)
    if options.nodes > 1:
        cpu["nodes"] = round(sum(cpu[n] for n in procs if n.startswith("node")), 2)
    result: dict[str, Any] = {
        "command": options.command,
        "machine": machine(),
        "nodes": options.nodes,
        "storage": options.storage,
        "pg_schema": net.pg.schema if net.pg is not None else None,  # dropped after the run
        "node_exit_codes": node_exits,
        "rate_target_per_s": options.rate_per_s or "max",
        "duration_s": duration,
        "traffic_s": round(traffic_s, 2),
        "subscribers": options.subscribers,
        "mix": options.mix,
        "smpp": options.smpp or "config defaults",
        "operations": sum(r.get("operations", 0) for r in reports.values()),
        "loans_per_s": round(window["loans"] / traffic_s, 1),
        "ussd_loans_per_s": round(window["ussd_loans"] / traffic_s, 1),
        "paybacks_per_s": round(window["paybacks"] / traffic_s, 1),
        "recharges_per_s": round(window["recharges"] / traffic_s, 1),
        "ads_per_s": round(ads / traffic_s, 1),
        "warmup_s": options.warmup_s,
        "in_window": window,
        "p50_ms": _round(latency.get("p50_ms")),
        "p95_ms": _round(latency.get("p95_ms")),
        "p99_ms": _round(latency.get("p99_ms")),
        "max_ms": _round(latency.get("max_ms")),
        "ussd_dialogs_measured": int(latency.get("count") or 0),
        "cpu_s": cpu,
        # What one loan costs each process (all its work in the window, divided by the
        # loans done): the figure that says how many cores a target rate needs.
        "cpu_ms_per_loan": ({name: round(1000 * seconds / window["loans"], 3)
                             for name, seconds in cpu.items()} if window["loans"] else None),
        # The system's own processes (the node(s), the broker, the database server),
        # without the simulators and the benchmark: what the operator's cores carry.
        "cpu_ms_per_loan_system": (round(1000 * sum(
            seconds for name, seconds in cpu.items()
            if name.startswith("node") and name != "nodes" or name in ("mosquitto", "postgresql")
        ) / window["loans"], 3) if window["loans"] else None),
        **node_cpu_per_operation(cpu.get("node", cpu.get("nodes", 0.0)), window),
        "counts": {**counts, "ads": ads},
        "ads_suppressed": ads_suppressed,
        "clock_start": options.clock_start,
        "outcomes": {name: r.get("outcomes", {}) for name, r in reports.items()},
        "late_starts": sum(r.get("late_starts", 0) for r in reports.values()),
        "settled": settled,
        "node_exit_code": node_exit,
        "ledger_matches_in": rec.matches,
        "reconciliation": rec.as_dict(),
        "report_dir": str(report_dir),
    }
    if options.profile_node and (report_dir / "node.prof").exists():
        result["node_profile"] = profile_top(report_dir / "node.prof", report_dir / "node-prof.txt")
    report_path = write_report(report_dir, result, samples_path, plot=options.plot)
    result["report"] = str(report_path)
    return result


def profile_top(prof: Path, out: Path, lines_max: int = 40) -> str:
    """The node's top functions by own time and by cumulative time, as text."""
    import io
    import pstats

    buffer = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buffer)
    stats.sort_stats("tottime").print_stats(lines_max)
    stats.sort_stats("cumulative").print_stats(lines_max)
    out.write_text(buffer.getvalue())
    return str(out)


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 2)


# --- output --------------------------------------------------------------------------------


def write_report(report_dir: Path, result: dict[str, Any], samples_path: Path, *,
                 plot: bool) -> Path:
    """report.md (+ latency.png) in `report_dir`; the raw figures in result.json."""
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    png = None
    if plot and samples_path.exists():
        png = plot_latency(samples_path, report_dir / "latency.png", result)
    m = result["machine"]
    rec = result["reconciliation"]
    lines = [
        "# Extra Balance end-to-end benchmark",
        "",
        f"- command: `{result['command']}`",
        f"- nodes: {result.get('nodes', 1)} on the {result.get('storage', 'sqlite')} ledger",
        f"- machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['platform']}",
        (f"- target rate: {result['rate_target_per_s']} ops/s for {result['duration_s']} s, "
        f"{result['subscribers']} subscribers, mix {json.dumps(result['mix'])}"),
        "",
        "| figure | value |",
        "|---|---|",
        f"| loans/s (all channels) | {result['loans_per_s']} |",
        f"| USSD loans/s | {result['ussd_loans_per_s']} |",
        f"| paybacks/s | {result['paybacks_per_s']} |",
        f"| recharges handled/s | {result['recharges_per_s']} |",
        f"| ads/s | {result['ads_per_s']} |",
        (f"| USSD latency p50 / p95 / p99 / max (ms) | {result['p50_ms']} / {result['p95_ms']}"
         f" / {result['p99_ms']} / {result['max_ms']} |"),
        f"| operations started | {result['operations']} (late starts {result['late_starts']}) |",
        f"| ledger matches the IN exactly | {'yes' if result['ledger_matches_in'] else 'NO'} |",
        "",
        "CPU seconds during the traffic, per process:",
        "",
        "| process | CPU s | share of one core |",
        "|---|---|---|",
    ]
    for name, seconds in result["cpu_s"].items():
        lines.append(f"| {name} | {seconds} | {seconds / max(result['traffic_s'], 1e-9):.0%} |")
    counts = ", ".join(f"{k} {v}" for k, v in result["counts"].items())
    summary = (f"Reconciliation: {rec['discrepancies']} discrepancies "
               f"({json.dumps(rec['by_kind'])}); {rec['loans_granted']} granted loans, "
               f"{rec['in_credits']} IN credits, {rec['recoveries_done']} recoveries, "
               f"{rec['in_debits']} IN debits, journal sum {rec['journal_sum_minor']}.")
    lines += ["", f"Ledger counts: {counts}", "", summary, ""]
    if png is not None:
        lines += [f"![USSD latency]({png.name})", ""]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def plot_latency(samples_path: Path, out: Path, result: dict[str, Any]) -> Path | None:
    samples = sorted(json.loads(samples_path.read_text()))
    if not samples:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(11, 4))
    hist.hist(samples, bins=60, color="#4878a8")
    hist.set_xlabel("USSD dial to final screen (ms)")
    hist.set_ylabel("dialogs")
    hist.set_title("latency histogram")
    n = len(samples)
    cdf.plot(samples, [(i + 1) / n for i in range(n)], color="#4878a8")
    for p, key in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
        if result.get(key) is not None:
            cdf.axvline(result[key], linestyle=":", color="grey")
            cdf.text(result[key], p, f" {key[:-3]} {result[key]:.0f} ms", fontsize=8)
    cdf.set_xlabel("ms")
    cdf.set_ylabel("share of dialogs")
    cdf.set_title("cumulative")
    fig.suptitle(f"{result['ussd_loans_per_s']} USSD loans/s, target "
                 f"{result['rate_target_per_s']} ops/s")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def print_summary(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Extra Balance end to end", show_header=False)
    for key in ("loans_per_s", "ussd_loans_per_s", "paybacks_per_s", "recharges_per_s",
                "ads_per_s", "p50_ms",
                "p95_ms", "p99_ms", "max_ms", "operations", "late_starts"):
        table.add_row(key, str(result[key]))
    for name, seconds in result["cpu_s"].items():
        table.add_row(f"cpu_s {name}", str(seconds))
    for key in ("node_cpu_ms_per_loan", "node_cpu_ms_per_payback"):
        if result.get(key) is not None:
            table.add_row(key, str(result[key]))
    per_loan = result.get("cpu_ms_per_loan")
    if per_loan:
        table.add_row("cpu_ms_per_loan", ", ".join(f"{k} {v}" for k, v in per_loan.items()))
    ok = result["ledger_matches_in"]
    table.add_row("ledger_matches_in", "[green]yes[/green]" if ok else "[red]NO[/red]")
    table.add_row("report", result["report"])
    console.print(table)
    if not ok:
        console.print(json.dumps(result["reconciliation"]["details"], indent=1))


if __name__ == "__main__":  # python -m bench.e2e ...
    out = run_cli(sys.argv[1:], seconds=2.0, json_output="--json" in sys.argv)
    if "--json" in sys.argv:
        print(json.dumps(out, sort_keys=True))
    sys.exit(0 if out["ledger_matches_in"] else 1)
