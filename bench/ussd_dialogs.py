"""Benchmark: complete USSD menu dialogs per second through the SMSC simulator, against
the real node (its own process, real SQLite ledger, real IN simulator over Diameter).

One dialog is what a subscriber does on his phone: dial `*123#` (deliver_sm, PSSR
indication) → the node's menu (submit_sm, USSR request) → pick a tier (`1`) → the
confirmation screen → confirm (`1`) → the node lends (ledger transaction, REFUND_ACCOUNT
CCR to the IN simulator, ledger again) → the final screen (submit_sm, PSSR response,
end of dialog); the node also sends the confirmation SMS. The latency is measured by
the virtual handset from the dial to the final screen.

Processes (bench/e2e.py's harness): a private Mosquitto (the node needs its recharge
subscription), the IN simulator and the SMSC simulator (bench/netsim.py workers), and
`python -m extrabalance run`. This process only steers and reads the figures.

The node's SMPP binds are configured here (`--binds`, `--window`, `--bind-rate`): the
docs/protocols.md defaults (one bind, window 10, 1 000 submits/s) would cap the run at
about 1 000 / 4 = 250 dialogs/s (three screens and one SMS per loan), which measures
the configuration, not the stack. The JSON says which caps applied.

Run: ``python -m bench.ussd_dialogs [--duration 10] [--concurrency 100]
[--subscribers 20000] [--binds 4] [--window 50] [--bind-rate 5000]``. Prints JSON.

``--in-process`` measures the SMPP stack and the simulator alone: the same dialogs
through `SmscSimulator` in this process, against a minimal menu ESME (the shared
`Esme`, three screens and a confirmation SMS per dialog, no ledger, no IN), with
delivery receipts on. It is what the simulator and the stack cost per dialog.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.e2e import (
    Network,
    default_config,
    in_spec,
    ledger_counts,
    node_config,
    opt_in,
    subscriber_msisdns,
    wait_connected,
    write_profiles,
)
from bench.procs import ProcessSet, cpu_seconds, dump_toml, free_port

SMPP_SYSTEM_ID = "extrabalance"
SMPP_PASSWORD_ENV = "EB_BENCH_SMPP_PASSWORD"
SUBSCRIBERS_MAX = 1_000_000
TRAFFIC_GRACE_S = 60.0  # a run's dialogs finish within duration + this
BINDS_SETTLE_S = 1.0  # after the first bind, the others come up within this
POLL_S = 0.25
WAIT_BOUND_S = 10.0
RECEIPTS_SETTLE_S = 0.2  # --in-process: the last receipts (sent 20 ms after their SMS)
# simulators/traffic.py kinds: menu dialogs only.
MENU_ONLY = {"ussd_menu": 1.0, "ussd_shortcut": 0.0, "sms_loan": 0.0, "out_of_balance": 0.0,
             "recharge": 0.0}


@contextlib.asynccontextmanager
async def network(workdir: Path, args: argparse.Namespace) -> Any:
    """Broker, IN and SMSC simulators, profiles, the node with the binds asked for."""
    from extrabalance.ledger.profiles import import_profiles
    from extrabalance.mosquitto import BrokerUnavailable, MosquittoBroker

    try:
        broker = MosquittoBroker(workdir / "mosquitto").start()
    except BrokerUnavailable as exc:
        raise SystemExit(f"bench.ussd_dialogs needs a private Mosquitto broker: {exc}")
    try:
        async with ProcessSet(workdir) as procs:
            base = default_config()
            diameter_port = free_port()
            in_worker = await procs.start_worker(
                "in-sim", ["--role", "in", "--spec",
                           json.dumps(in_spec(base, diameter_port, broker.port, args.seed))])
            password = os.urandom(4).hex()  # SMPP passwords are at most 8 octets
            smsc_worker = await procs.start_worker(
                "smsc-sim", ["--role", "smsc", "--spec", json.dumps({
                    "system_id": SMPP_SYSTEM_ID, "password": password,
                    "short_code": base["smpp"]["short_code"], "seed": args.seed})])
            db_path = workdir / "extrabalance.db"
            msisdns = subscriber_msisdns(base, args.subscribers)
            profiles = workdir / "profiles.csv"
            # English only: the screens stay GSM 7-bit, like most real traffic.
            write_profiles(profiles, msisdns, args.seed, arabic_share=0.0)
            report = import_profiles(db_path, profiles, progress=False)
            if report.bad_rows_total:
                raise RuntimeError(f"generated profiles rejected: {report.bad_rows[:5]}")
            opt_in(db_path, msisdns, 0.0, args.seed)
            config = node_config(base, db_path=db_path, diameter_port=diameter_port,
                                 in_ports=in_worker.ready["ports"],
                                 smpp_port=smsc_worker.ready["ports"]["smpp"],
                                 mqtt_port=broker.port, client_id="extrabalance-bench-ussd")
            bind = {**config["smpp"]["binds"][0], "window_max": args.window,
                    "submit_rate_max_per_s": args.bind_rate}
            config["smpp"]["binds"] = [dict(bind) for _ in range(args.binds)]
            config_path = workdir / "node.toml"
            config_path.write_text(dump_toml(config), encoding="utf-8")
            env = {SMPP_PASSWORD_ENV: password, "EB_LOG_LEVEL": "WARNING"}
            node = await procs.start_node(config_path, env=env, profile_path=args.profile)
            net = Network(procs, workdir, broker, in_worker, smsc_worker, node, config_path,
                          db_path, env, msisdns, base)
            await wait_connected(net)
            await asyncio.sleep(BINDS_SETTLE_S)  # the node is ready at its first bind
            yield net
    finally:
        broker.stop()


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    async with network(workdir, args) as net:
        procs = {"node": net.node, "in_sim": net.in_worker, "smsc_sim": net.smsc_worker}
        broker_pid = net.broker._process.pid if net.broker._process is not None else None
        cpu0 = {name: p.cpu_s() for name, p in procs.items()}
        cpu0["mosquitto"] = (cpu_seconds(broker_pid) or 0.0) if broker_pid else 0.0
        started = time.monotonic()
        await net.smsc_worker.call(
            "traffic_start", msisdns=net.msisdns, mix=MENU_ONLY, rate_per_s=None,
            duration_s=args.duration, concurrency_max=args.concurrency, seed=args.seed)
        deadline = started + args.duration + TRAFFIC_GRACE_S
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            if (await net.smsc_worker.call("progress"))["done"]:
                break
        answer = await net.smsc_worker.call("traffic_wait", stop=True)
        elapsed_s = time.monotonic() - started
        cpu1 = {name: p.cpu_s() for name, p in procs.items()}
        cpu1["mosquitto"] = (cpu_seconds(broker_pid) or 0.0) if broker_pid else 0.0
        smsc_stats = (await net.smsc_worker.call("stats"))["stats"]
        await net.node.stop()
        await net.in_worker.call("quit")
        await net.smsc_worker.call("quit")
    report = answer["report"]
    counts = ledger_counts(net.db_path)
    outcomes = report.get("outcomes", {})
    completed = sum(v for k, v in outcomes.items() if k.startswith("ussd_menu:")
                    and "timeout" not in k and "error" not in k)
    traffic_s = float(report.get("elapsed_s") or elapsed_s)
    latency = report.get("ussd_latency", {})
    return {
        "bench": "ussd_dialogs",
        "dialogs": report.get("operations", 0),
        "dialogs_completed": completed,
        "seconds": round(traffic_s, 2),
        "dialogs_per_s": round(completed / traffic_s, 1),
        "ussd_loans_per_s": round(counts["ussd_loans"] / traffic_s, 1),
        "p50_ms": _ms(latency.get("p50_ms")),
        "p95_ms": _ms(latency.get("p95_ms")),
        "p99_ms": _ms(latency.get("p99_ms")),
        "max_ms": _ms(latency.get("max_ms")),
        "outcomes": outcomes,
        "ledger": counts,
        "smsc": {k: smsc_stats.get(k) for k in ("mt_ussd", "mt_sms", "orphan_screens",
                                                 "screen_timeouts", "throttled")},
        "cpu_s": {name: round(cpu1[name] - cpu0[name], 2) for name in cpu0},
        "configured": {"binds": args.binds, "window_max": args.window,
                       "bind_submit_rate_max_per_s": args.bind_rate,
                       "binds_total_submits_per_s": args.binds * args.bind_rate,
                       "concurrency": args.concurrency, "subscribers": args.subscribers},
    }


class _MenuEsme:
    """Stands in for the node in --in-process mode: `*123#` → menu, `1` → confirm,
    `1` → final screen plus an SMS, echoing its_session_info as the node does."""

    MENU = "Extra Balance\n1 10.00 EGP\n2 20.00 EGP\n3 50.00 EGP"
    CONFIRM = "Borrow 10.00 EGP? Fee 1.50 EGP.\n1 Confirm\n2 Cancel"
    DONE = "Done: 10.00 EGP added to your balance. You owe 11.50 EGP."

    def __init__(self, port: int, args: argparse.Namespace, password: str) -> None:
        from extrabalance.smpp.aio.client import BindConfig, Esme

        self.steps: dict[tuple[str, int], int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.esme = Esme([BindConfig("127.0.0.1", port, SMPP_SYSTEM_ID, password,
                                     window_max=args.window,
                                     submit_rate_max_per_s=args.bind_rate)
                          for _ in range(args.binds)], self.on_deliver)

    def on_deliver(self, pdu: Any, bind: str) -> int:
        # Answered at once (no task per deliver_sm); the screens go out in a task.
        if pdu.is_delivery_receipt or pdu.ussd_service_op is None:
            return 0
        task = asyncio.get_running_loop().create_task(self._answer(pdu))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return 0

    async def _answer(self, pdu: Any) -> None:
        from extrabalance.smpp.pdu import ItsSessionInfo, UssdOp
        from extrabalance.smpp.ussd import ussd_submit

        its = pdu.its_session_info
        key = (pdu.source_addr, its.session_number if its is not None else -1)
        step = 0 if pdu.ussd_service_op == UssdOp.PSSR_INDICATION else self.steps.get(key, 0)
        final = step >= 2
        if final:
            self.steps.pop(key, None)
        else:
            self.steps[key] = step + 1
        text = (self.MENU, self.CONFIRM, self.DONE)[min(step, 2)]
        session = None if its is None else ItsSessionInfo(
            its.session_number, min(its.sequence_number + 1, 0x7F), final)
        await self.esme.submit(ussd_submit(
            pdu.source_addr, "*123#", text, session=session,
            op=UssdOp.PSSR_RESPONSE if final else UssdOp.USSR_REQUEST))
        if final:
            await self.esme.send_sms("1234", pdu.source_addr, self.DONE)


async def run_in_process(args: argparse.Namespace) -> dict[str, Any]:
    from simulators.smsc import SmscSimulator
    from simulators.traffic import TrafficConfig, TrafficGenerator, TrafficMix

    password = os.urandom(4).hex()
    smsc = SmscSimulator(system_id=SMPP_SYSTEM_ID, password=password, delivery_receipts=True,
                         seed=args.seed)
    await smsc.start()
    app = _MenuEsme(smsc.port, args, password)
    await app.esme.start()
    await app.esme.wait_bound(WAIT_BOUND_S)
    await smsc.wait_bound(WAIT_BOUND_S)
    await asyncio.sleep(BINDS_SETTLE_S)
    msisdns = [f"2010{i:08d}" for i in range(args.subscribers)]
    generator = TrafficGenerator(TrafficConfig(
        msisdns=msisdns, mix=TrafficMix(**MENU_ONLY), rate_per_s=None,
        duration_s=args.duration, concurrency_max=args.concurrency, seed=args.seed), smsc=smsc)
    cpu0 = time.process_time()
    report = (await generator.run()).as_dict()
    cpu_s = time.process_time() - cpu0
    await asyncio.sleep(RECEIPTS_SETTLE_S)
    stats = dict(smsc.stats)
    await app.esme.close()
    await smsc.close()
    outcomes: dict[str, int] = report.get("outcomes", {})  # type: ignore[assignment]
    completed = outcomes.get("ussd_menu:final", 0)
    traffic_s = float(report.get("elapsed_s") or args.duration)  # type: ignore[arg-type]
    latency: dict[str, Any] = report.get("ussd_latency", {})  # type: ignore[assignment]
    return {
        "bench": "ussd_dialogs --in-process",
        "dialogs": report.get("operations", 0),
        "dialogs_completed": completed,
        "seconds": round(traffic_s, 2),
        "dialogs_per_s": round(completed / traffic_s, 1),
        "p50_ms": _ms(latency.get("p50_ms")),
        "p95_ms": _ms(latency.get("p95_ms")),
        "p99_ms": _ms(latency.get("p99_ms")),
        "max_ms": _ms(latency.get("max_ms")),
        "cpu_us_per_dialog": round(1e6 * cpu_s / max(completed, 1)),
        "outcomes": outcomes,
        "smsc": {k: stats.get(k) for k in ("mt_ussd", "mt_sms", "receipts", "orphan_screens",
                                            "screen_timeouts", "throttled")},
        "configured": {"binds": args.binds, "window_max": args.window,
                       "bind_submit_rate_max_per_s": args.bind_rate,
                       "concurrency": args.concurrency, "subscribers": args.subscribers},
    }


def _ms(value: Any) -> float | None:
    return None if value is None else round(float(value), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ussd_dialogs",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of traffic")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="virtual subscribers dialling at once")
    parser.add_argument("--subscribers", type=int, default=20_000)
    parser.add_argument("--binds", type=int, default=4, help="node binds to the SMSC")
    parser.add_argument("--window", type=int, default=50, help="window_max per bind")
    parser.add_argument("--bind-rate", type=int, default=5000,
                        help="submit_rate_max_per_s per bind")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--in-process", action="store_true",
                        help="the simulator and the SMPP stack alone (no node), one process")
    parser.add_argument("--profile", type=Path, default=None,
                        help="run the node under cProfile and write the stats to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.subscribers <= SUBSCRIBERS_MAX:
        parser.error(f"--subscribers must be within 1..{SUBSCRIBERS_MAX}")
    from extrabalance.bench import machine

    if args.in_process:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        result = asyncio.run(run_in_process(args))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-ussd-") as tmp:
            result = asyncio.run(run(args, Path(tmp)))
    result["machine"] = machine()
    result["command"] = "python -m bench.ussd_dialogs " + " ".join(sys.argv[1:] if argv is None
                                                                    else argv)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
