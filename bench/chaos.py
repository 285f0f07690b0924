"""`extrabalance chaos`: a mixed load while the node, its links and the broker fail.

What this file owns: the chaos run. The same processes as the end-to-end benchmark
(bench/e2e.py `network`): node, IN simulator, SMSC simulator, a private Mosquitto.
While the virtual subscribers borrow, get advances and recharge, faults are injected
at random moments (seeded):

* the node is SIGKILLed and restarted (same ledger file, same MQTT client id);
* the IN nodes' Diameter connections are cut (the IN simulator's disconnect fault);
* the SMSC drops the node's SMPP binds;
* the broker is restarted, gracefully (SIGTERM) and by SIGKILL;
* with `--storage postgresql`, the PostgreSQL server is restarted: a fast shutdown
  (`pg_ctl -m fast`) and a crash (`-m immediate`), each down a few seconds. The run
  starts a cluster of its own for that (bench/pg_server.py: initdb, a free loopback
  port, fsync and synchronous_commit on) unless `--pg-url` names a server, which is
  then never restarted.

Then a quiet period: no traffic, the node up, until every acknowledged recharge
reached the ledger and the resolver settled every CREDITING/UNKNOWN/RECOVERING
operation (bounded). The ledger is then reconciled against the IN simulator
(bench/reconcile.py, recharges and dialogs included): every loan and recovery equals
what the IN applied, every acknowledged recharge event is accounted for exactly once,
no USSD dialog or SMS lent twice. A table of the faults and of the discrepancies is
printed; exit 1 on any discrepancy.

    extrabalance chaos [--kills 20] [--duration 150] [--rate 60] [--seed 7] [--json]
        [--nodes 2 --storage postgresql [--pg-url URL] [--pg-restarts 1 --pg-crashes 1]]

Several nodes on one PostgreSQL ledger (docs/scale-out.md): node 1 is the survivor;
the SIGKILLs hit the other nodes (each restarted), and at about two thirds of the
traffic one of them is SIGKILLed for good (`node_lost`). The IN's Diameter failover and
the gateway's binds carry the traffic to the nodes left; the reconciliation afterwards
must find nothing lost or doubled, the dead node's half-done operations included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.e2e import Network, check_nodes, network, parse_mix, settle, wait_connected
from bench.pg_server import PgServer
from bench.reconcile import reconcile, settle_advances_with_in
from extrabalance.argparsing import Parser
from extrabalance.clock import SYSTEM_CLOCK

CHAOS_CLIENT_ID = "extrabalance-chaos"  # the node's MQTT client id, the same on every restart
# Durable broker for the run: save after every change rather than every second, so a
# SIGKILL loses as little as Mosquitto allows (see bench/reconcile.py for the rest).
BROKER_CONFIG = ("autosave_on_changes true",)
DEFAULT_MIX = "ussd=4,sms=1,oob=2,recharge=3"
RESTART_PAUSE_MAX_S = 1.0  # a killed node stays down up to this long
QUIET_MAX_S = 90.0  # the quiet period ends when all is settled, or after this long
NODE_UP_WAIT_S = 30.0
CLUSTER_SAGA_LEASE_S = 20.0  # the nodes' saga lease in a chaos run with several nodes
PG_DOWN_S = 3.0  # a restarted PostgreSQL stays down this long
PG_FAULTS = ("pg_restart", "pg_crash")


@dataclass
class ChaosOptions:
    kills: int = 20
    duration_s: float = 150.0
    rate_per_s: float = 60.0
    subscribers: int = 2000
    mix: str = DEFAULT_MIX
    seed: int = 7
    in_disconnects: int | None = None  # default: kills // 2 (at least 1)
    smpp_drops: int | None = None
    broker_restarts: int | None = None  # graceful; default max(1, kills // 10)
    broker_kills: int | None = None
    report_dir: Path | None = None
    json_output: bool = False
    quiet_max_s: float = QUIET_MAX_S
    concurrency_max: int = 100
    nodes: int = 1  # node processes on one ledger (more than one: storage "postgresql")
    storage: str = "sqlite"
    pg_dsn: str | None = None
    # With several nodes: how soon the survivor takes over the sagas of the node lost
    # for good ([storage] saga_lease_s); the quiet period waits at least this long.
    saga_lease_s: float = CLUSTER_SAGA_LEASE_S
    # PostgreSQL restarts (a server of the run's own only; none when `pg_dsn` is given).
    pg_restarts: int = 1  # pg_ctl -m fast, start again after pg_down_s
    pg_crashes: int = 1  # pg_ctl -m immediate (every server process killed), likewise
    pg_down_s: float = PG_DOWN_S


@dataclass
class ChaosResult:
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[tuple[float, str, str]] = field(default_factory=list)
    reconciliation: dict[str, Any] = field(default_factory=dict)
    traffic: dict[str, Any] = field(default_factory=dict)
    settled: dict[str, Any] = field(default_factory=dict)
    workdir: str = ""
    nodes: dict[str, Any] = field(default_factory=dict)  # how many, which were lost

    @property
    def discrepancies(self) -> int:
        return int(self.reconciliation.get("discrepancies", 1))

    def as_dict(self) -> dict[str, Any]:
        return {"faults": dict(self.faults), "discrepancies": self.discrepancies,
                "reconciliation": self.reconciliation, "traffic": self.traffic,
                "settled": self.settled, "workdir": self.workdir,
                "fault_log": self.fault_log, "nodes": self.nodes}


def plan(options: ChaosOptions) -> list[tuple[float, str]]:
    """(seconds after the traffic starts, fault) for every fault, in time order."""
    rng = random.Random(options.seed)
    counts = {
        "node_kill": options.kills,
        "in_disconnect": options.in_disconnects if options.in_disconnects is not None
        else max(1, options.kills // 2),
        "smpp_drop": options.smpp_drops if options.smpp_drops is not None
        else max(1, options.kills // 2),
        "broker_restart": options.broker_restarts if options.broker_restarts is not None
        else max(1, options.kills // 10),
        "broker_kill": options.broker_kills if options.broker_kills is not None
        else max(1, options.kills // 10),
    }
    if options.storage == "postgresql" and options.pg_dsn is None:
        counts["pg_restart"] = options.pg_restarts
        counts["pg_crash"] = options.pg_crashes
    start, end = 0.05 * options.duration_s, 0.9 * options.duration_s
    lost_at = LOST_AT_SHARE * options.duration_s
    # With several nodes the restarts come before the loss: after it, only the
    # survivor is left, and it is never killed.
    kill_end = lost_at if options.nodes > 1 else end
    events = [(rng.uniform(start, kill_end if kind == "node_kill" else end), kind)
              for kind, n in counts.items() for _ in range(n)]
    if options.nodes > 1:
        events.append((lost_at, "node_lost"))
    return sorted(events)


LOST_AT_SHARE = 0.66  # with several nodes, one is lost for good this far into the traffic


async def inject(net: Network, kind: str, rng: random.Random, lost: set[int],
                 pg_server: PgServer | None = None, pg_down_s: float = PG_DOWN_S) -> str:
    """One fault; returns what was done (for the log). `lost`: indexes of the nodes
    killed for good (never restarted); `pg_server`: the run's own PostgreSQL."""
    # With several nodes the first is the survivor: the others take the kills.
    targets = [i for i in range(len(net.nodes)) if i not in lost and (i or len(net.nodes) == 1)]
    if kind in ("node_kill", "node_lost") and not targets:
        return "no node left to kill but the survivor: skipped"
    if kind == "node_kill":
        index = rng.choice(targets)
        node = net.nodes[index]
        await node.kill()
        pause_s = rng.uniform(0.0, RESTART_PAUSE_MAX_S)
        await asyncio.sleep(pause_s)
        await net.procs.restart_node(node, net.config_paths[index], env=net.node_env)
        return f"{node.name}: SIGKILL, restarted after {pause_s:.2f} s"
    if kind == "node_lost":
        index = targets[-1]
        await net.nodes[index].kill()
        lost.add(index)
        return f"{net.nodes[index].name}: SIGKILL, never restarted"
    if kind == "in_disconnect":
        answer = await net.in_worker.call("disconnect")
        return f"{answer['closed']} Diameter connection(s) cut"
    if kind == "smpp_drop":
        answer = await net.smsc_worker.call("drop_binds")
        return f"{answer['dropped']} SMPP bind(s) dropped"
    if kind == "broker_restart":
        await asyncio.to_thread(net.broker.restart, graceful=True)
        return "SIGTERM, restarted"
    if kind == "broker_kill":
        await asyncio.to_thread(net.broker.restart, graceful=False)
        return "SIGKILL, restarted"
    if kind in PG_FAULTS:
        if pg_server is None:
            return "no PostgreSQL of the run's own: skipped"
        mode = "fast" if kind == "pg_restart" else "immediate"
        started = time.monotonic()
        await asyncio.to_thread(pg_server.restart, mode, pg_down_s)
        return f"pg_ctl -m {mode}, up again after {time.monotonic() - started:.2f} s"
    raise ValueError(kind)


async def run_chaos(options: ChaosOptions, *, echo: Any = None) -> ChaosResult:
    result = ChaosResult()
    stamp = SYSTEM_CLOCK.now().strftime("%Y%m%d-%H%M%S")
    report_dir = options.report_dir or Path("var/bench") / f"chaos-{stamp}"
    workdir = report_dir / "run"
    result.workdir = str(workdir)
    rng = random.Random(options.seed + 1)
    broker_kills_s: list[float] = []
    say = echo or (lambda _text: None)
    mix = parse_mix(options.mix)
    lost: set[int] = set()
    pg_server = None
    pg_dsn = options.pg_dsn
    with contextlib.ExitStack() as own_pg:
        if options.storage == "postgresql" and pg_dsn is None:
            pg_server = own_pg.enter_context(PgServer())
            pg_dsn = pg_server.dsn
            say(f"PostgreSQL of the run's own at {pg_dsn} ({pg_server.bin_dir})")
        await _run_network(options, result, workdir, rng, broker_kills_s, say, mix, lost,
                           pg_server, pg_dsn)
    in_dump_path, smsc_dump_path = workdir / "in-dump.json", workdir / "smsc-dump.json"
    db_path = workdir / "extrabalance.db"
    in_dump = json.loads(in_dump_path.read_text())
    # Advances whose answers never reached the IN in time (a node SIGKILLed between
    # the commit and the write): settled from the IN's records, as an operator does.
    reversed_advances = settle_advances_with_in(db_path, in_dump)
    rec = reconcile(db_path, in_dump,
                    json.loads(smsc_dump_path.read_text()), check_recharges=True,
                    broker_kills_s=tuple(broker_kills_s))
    rec.notes.append(f"reconcile-in reversed {sum(reversed_advances.values())} advances"
                     " the IN never applied")
    result.reconciliation = rec.as_dict()
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "chaos.json").write_text(json.dumps(result.as_dict(), indent=2))
    return result


async def _run_network(options: ChaosOptions, result: ChaosResult, workdir: Path,
                       rng: random.Random, broker_kills_s: list[float], say: Any,
                       mix: dict[str, int], lost: set[int], pg_server: PgServer | None,
                       pg_dsn: str | None) -> None:
    """The traffic, the faults and the quiet period; the IN's and SMSC's records
    dumped into `workdir` and, on PostgreSQL, the ledger copied into its SQLite file."""
    async with network(workdir, subscribers=options.subscribers, seed=options.seed,
                       log_level="WARNING", client_id=CHAOS_CLIENT_ID, arabic_share=0.0,
                       broker_config=BROKER_CONFIG, nodes=options.nodes,
                       storage=options.storage, pg_dsn=pg_dsn,
                       saga_lease_s=options.saga_lease_s if options.nodes > 1 else None) as net:
        total = sum(mix.values())
        smsc_mix = {k: v for k, v in mix.items() if k in ("ussd_menu", "ussd_shortcut", "sms_loan")}
        in_mix = {k: v for k, v in mix.items() if k in ("out_of_balance", "recharge")}
        common = {"duration_s": options.duration_s, "concurrency_max": options.concurrency_max,
                  "msisdns": net.msisdns}
        # A worker whose share of the mix is nothing gets no traffic (a USSD-only or
        # recharge-only chaos run).
        workers = []
        for worker, worker_mix, seed in ((net.smsc_worker, smsc_mix, options.seed),
                                         (net.in_worker, in_mix, options.seed + 7)):
            share = sum(worker_mix.values())
            if share > 0:
                await worker.call("traffic_start", mix=worker_mix, seed=seed,
                                  rate_per_s=options.rate_per_s * share / total, **common)
                workers.append(worker)
        t0 = time.monotonic()
        for at_s, kind in plan(options):
            delay = t0 + at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if kind == "broker_kill":
                broker_kills_s.append(SYSTEM_CLOCK.time())
            began = time.monotonic()
            what = await inject(net, kind, rng, lost, pg_server, options.pg_down_s)
            result.faults[kind] += 1
            result.fault_log.append((round(time.monotonic() - t0, 2), kind, what))
            say(f"{time.monotonic() - t0:7.2f} s  {kind:<15} {what}")
            if kind in PG_FAULTS:
                # The rest of the plan moves by the restart's length: the faults due
                # meanwhile are not fired all at once the moment the server is back.
                t0 += time.monotonic() - began
        for worker in workers:
            answer = await worker.call("traffic_wait", timeout_s=options.duration_s + 120)
            result.traffic[worker.name] = answer["report"]
        # Quiet period: the nodes up and connected (all but those lost for good), no
        # traffic, until all is settled.
        died = [node.name for index, node in enumerate(net.nodes)
                if not node.alive and index not in lost]  # by themselves, not by a fault
        for index, node in enumerate(net.nodes):
            if not node.alive and index not in lost:
                await net.procs.restart_node(node, net.config_paths[index], env=net.node_env)
        await wait_connected(net, NODE_UP_WAIT_S, nodes_up=len(net.nodes) - len(lost))
        say("quiet period: waiting for the resolver and the recharge backlog")
        # A node lost for good keeps its sagas until their lease runs out; then the
        # survivor's next resolver run takes them (nothing moves meanwhile).
        quiet_s = options.quiet_max_s + (options.saga_lease_s if lost else 0.0)
        result.settled = await settle(net, max_s=quiet_s)
        result.nodes = {"nodes": len(net.nodes), "lost": sorted(net.nodes[i].name for i in lost),
                        "died_during_traffic": died,
                        "exit_codes": await net.stop_nodes()}
        in_dump_path, smsc_dump_path = workdir / "in-dump.json", workdir / "smsc-dump.json"
        await net.in_worker.call("dump", path=str(in_dump_path))
        await net.smsc_worker.call("dump", path=str(smsc_dump_path))
        await net.in_worker.call("quit")
        await net.smsc_worker.call("quit")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="extrabalance chaos",
                                description="Kill the node, cut its links, restart the broker "
                                            "under load; then check every minor unit.")
    p.add_argument("--kills", type=int, default=20, help="node SIGKILLs (default 20)")
    p.add_argument("--duration", type=float, default=150.0, help="seconds of traffic")
    p.add_argument("--rate", type=float, default=60.0, help="operations per second")
    p.add_argument("--subscribers", type=int, default=2000)
    p.add_argument("--mix", default=DEFAULT_MIX)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--in-disconnects", type=int, default=None)
    p.add_argument("--smpp-drops", type=int, default=None)
    p.add_argument("--broker-restarts", type=int, default=None)
    p.add_argument("--broker-kills", type=int, default=None)
    p.add_argument("--report", default=None, help="directory (default var/bench/chaos-<time>)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--nodes", type=int, default=1,
                   help="node processes on one ledger; with more than one (and --storage"
                        " postgresql) node 1 survives, the others are killed and one is lost")
    p.add_argument("--storage", choices=("sqlite", "postgresql"), default="sqlite",
                   help="postgresql: a schema of the run's own on a PostgreSQL cluster of"
                        " the run's own (or on --pg-url), dropped after")
    p.add_argument("--saga-lease", type=float, default=CLUSTER_SAGA_LEASE_S,
                   help="with several nodes, the nodes' [storage] saga_lease_s (default"
                        f" {CLUSTER_SAGA_LEASE_S:g}): the survivor takes over the lost node's"
                        " sagas this long after its last renewal")
    p.add_argument("--pg-url", default=None,
                   help="with --storage postgresql: the server to use (a schema of the run's"
                        " own; never restarted). Default: a cluster of the run's own (initdb,"
                        " pg_ctl on a free loopback port), restarted during the run")
    p.add_argument("--pg-restarts", type=int, default=1,
                   help="fast PostgreSQL restarts (pg_ctl -m fast) of the run's own server")
    p.add_argument("--pg-crashes", type=int, default=1,
                   help="PostgreSQL crashes (pg_ctl -m immediate) of the run's own server")
    p.add_argument("--pg-down", type=float, default=PG_DOWN_S,
                   help=f"seconds PostgreSQL stays down at each restart (default {PG_DOWN_S:g})")
    return p


def print_tables(result: ChaosResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    faults = Table(title="faults injected")
    faults.add_column("fault")
    faults.add_column("count", justify="right")
    for kind, n in sorted(result.faults.items()):
        faults.add_row(kind, str(n))
    console.print(faults)
    rec = result.reconciliation
    found = Table(title="discrepancies (must be zero)")
    found.add_column("check")
    found.add_column("found", justify="right")
    for kind, n in sorted(rec.get("by_kind", {}).items()):
        found.add_row(kind, f"[red]{n}[/red]")
    found.add_row("total", str(rec.get("discrepancies")))
    console.print(found)
    console.print(
        f"loans {rec.get('loans_granted')} (IN credits {rec.get('in_credits')}), recoveries "
        f"{rec.get('recoveries_done')} (IN debits {rec.get('in_debits')}), recharges checked "
        f"{rec.get('recharges_checked')}, journal sum {rec.get('journal_sum_minor')}; "
        f"settled: {result.settled}")
    for note in rec.get("notes", []):
        console.print(f"note: {note}")
    for kind, details in rec.get("details", {}).items():
        console.print(f"[bold]{kind}[/bold]: " + "; ".join(details[:5]))


def run_cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.kills < 0 or args.duration <= 0 or args.rate <= 0:
        print("extrabalance chaos: --kills >= 0, --duration > 0 and --rate > 0", file=sys.stderr)
        return 2
    if min(args.pg_restarts, args.pg_crashes) < 0 or args.pg_down < 0:
        print("extrabalance chaos: --pg-restarts, --pg-crashes and --pg-down >= 0",
              file=sys.stderr)
        return 2
    check_nodes(args.nodes, args.storage, "extrabalance chaos")
    options = ChaosOptions(
        kills=args.kills, duration_s=args.duration, rate_per_s=args.rate,
        subscribers=args.subscribers, mix=args.mix, seed=args.seed,
        in_disconnects=args.in_disconnects, smpp_drops=args.smpp_drops,
        broker_restarts=args.broker_restarts, broker_kills=args.broker_kills,
        report_dir=Path(args.report) if args.report else None, json_output=args.json,
        nodes=args.nodes, storage=args.storage, saga_lease_s=args.saga_lease,
        pg_dsn=args.pg_url, pg_restarts=args.pg_restarts, pg_crashes=args.pg_crashes,
        pg_down_s=args.pg_down,
    )
    result = asyncio.run(run_chaos(options, echo=None if args.json else print))
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True))
    else:
        print_tables(result)
    return 1 if result.discrepancies else 0


if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:]))
