"""Benchmark: advertisement SMS submitted per second to the SMSC simulator, caps applied.

What is measured, in one run against one SMSC simulator (its own process, so it does
not share the node's core):

* ours: `Advertiser.offer` for `--subscribers` distinct subscribers, each offered
  `--offers-each` times (the repeats hit the caps, so both paths are timed): one
  ledger transaction per offer (SQLite, WAL, synchronous=FULL, group commit) that
  reads the subscriber and his last 24 hours of ads, decides, takes a rate token and
  records the ad; then the node's `SmsNotifier.notify` renders the template and the
  `Esme` submits over `--binds` binds and waits for each submit_sm_resp.
* esme_raw: the same number of SMS through our `Esme` alone (no policy, no ledger).
* smpplib (the peer library): the same number of submit_sm through smpplib's client,
  one bind, sending a window of PDUs and then reading their responses.

Rates: each bind's submit cap (BindConfig.submit_rate_max_per_s) and the ads rate
(ads.send_rate_max_per_s) are set from `--bind-rate` and `--ads-rate` so they are not
what limits the figure unless asked; the JSON says which limit applied. The defaults
of docs/protocols.md (window 10, 1 000 submits/s per bind) would cap one bind at 1 000/s:
the benchmark runs `--binds` binds of `--window` each, as an operator would configure
a node for that rate.

CPU: besides the rates, each phase reports the CPU time this process (all its
threads: event loop and ledger writer) and the SMSC simulator process spent per
message, in microseconds. On a shared machine the rates move with the neighbours'
load; the CPU cost per message does much less, and 1e6 / cpu_us is what one core
would sustain.

Run: ``python -m bench.ads [--subscribers 20000] [--offers-each 2] [--binds 8]``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Self

import structlog

from bench.procs import cpu_seconds
from extrabalance.clock import SYSTEM_CLOCK
from extrabalance.config import load_settings
from extrabalance.ledger import Ledger
from extrabalance.service.ads import AdTrigger, Advertiser, rules_from_settings
from extrabalance.service.templates import Templates

PASSWORD = "benchpw"
SYSTEM_ID = "extrabalance"
WAIT_S = 30.0  # bound on start-up waits


class CountingEvents:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def emit(self, kind: str, **fields: Any) -> None:
        self.counts[f"{kind}:{fields.get('reason', '')}"] += 1


def start_smsc() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "extrabalance", "sim", "smsc", "--host", "127.0.0.1",
         "--port", "0", "--system-id", SYSTEM_ID, "--password", PASSWORD],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(r"SMPP on [\d.]+:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    raise RuntimeError("SMSC simulator did not start")


def make_esme(port: int, binds: int, bind_rate: int, window: int) -> Any:
    from extrabalance.smpp.aio.client import BindConfig, Esme

    async def no_deliver(pdu: Any, system_id: str) -> int:
        return 0

    return Esme([BindConfig("127.0.0.1", port, SYSTEM_ID, PASSWORD, window_max=window,
                            submit_rate_max_per_s=bind_rate) for _ in range(binds)], no_deliver)


class CpuMeter:
    """CPU seconds of this process and of the SMSC simulator over one phase."""

    def __init__(self, smsc_pid: int) -> None:
        self.smsc_pid = smsc_pid
        self.bench_s = 0.0
        self.smsc_s = 0.0

    def __enter__(self) -> Self:
        self._bench0 = time.process_time()
        self._smsc0 = cpu_seconds(self.smsc_pid) or 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.bench_s = time.process_time() - self._bench0
        self.smsc_s = (cpu_seconds(self.smsc_pid) or 0.0) - self._smsc0

    def per_message_us(self, count: int) -> dict[str, float]:
        return {"bench_process": round(1e6 * self.bench_s / max(count, 1), 1),
                "smsc_simulator": round(1e6 * self.smsc_s / max(count, 1), 1)}


async def run_ours(args: argparse.Namespace, port: int, workdir: Path,
                   smsc_pid: int) -> dict[str, Any]:
    from extrabalance.adapters.sms_notifier import SmsNotifier

    settings = load_settings(overrides={
        "ads": {"quiet_hours": None, "send_rate_max_per_s": args.ads_rate,
                "inflight_max": args.concurrency, "min_interval_s": 3600, "max_per_day": 2},
        "smpp": {"binds": [{"port": port, "system_id": SYSTEM_ID, "window_max": args.window,
                            "submit_rate_max_per_s": args.bind_rate}] * args.binds},
    })
    policy = settings.policy()
    templates = Templates(settings.templates, "en", settings.node.currency_exponent)
    esme = make_esme(port, args.binds, args.bind_rate, args.window)
    await esme.start()
    await esme.wait_bound(WAIT_S)
    await asyncio.sleep(0.5)  # let every bind come up
    channel = SmsNotifier(esme.send_sms, templates=templates, short_code="1234")
    ledger = Ledger(workdir / "ads.db")
    events = CountingEvents()
    advertiser = Advertiser(ledger, channel, events, policy, rules_from_settings(settings),
                            SYSTEM_CLOCK.now)
    msisdns = [f"2010{i:08d}" for i in range(args.subscribers)]
    work = [m for _ in range(args.offers_each) for m in msisdns]
    queue = iter(work)

    async def worker() -> None:
        for msisdn in queue:
            await advertiser.offer(msisdn, AdTrigger.LOW_BALANCE if hash(msisdn) % 2
                                   else AdTrigger.OUT_OF_BALANCE)

    started = time.perf_counter()
    with CpuMeter(smsc_pid) as cpu:
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed_s = time.perf_counter() - started
    await ledger.close()
    await esme.close()
    sent = sum(v for k, v in events.counts.items() if k.startswith("ad_sent"))
    suppressed = {k.split(":", 1)[1]: v for k, v in events.counts.items()
                  if k.startswith("ad_suppressed")}
    return {
        "offers": len(work), "sent": sent, "suppressed": suppressed,
        "seconds": round(elapsed_s, 3),
        "offers_per_s": round(len(work) / elapsed_s),
        "sent_per_s": round(sent / elapsed_s),
        "submits_acknowledged": channel.stats["sms_out"], "submit_failures": channel.stats["sms_failed"],
        "cpu_us_per_offer": cpu.per_message_us(len(work)),
        "cpu_us_per_sent_ad": cpu.per_message_us(sent),
    }


async def run_esme_raw(args: argparse.Namespace, port: int, count: int,
                       smsc_pid: int) -> tuple[float, dict[str, float]]:
    esme = make_esme(port, args.binds, args.bind_rate, args.window)
    await esme.start()
    await esme.wait_bound(WAIT_S)
    await asyncio.sleep(0.5)
    text = "Running low? Dial *123# for Extra Balance and pay when you recharge."
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            await esme.send_sms("1234", f"2011{i:08d}", text)

    started = time.perf_counter()
    with CpuMeter(smsc_pid) as cpu:
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed_s = time.perf_counter() - started
    await esme.close()
    return count / elapsed_s, cpu.per_message_us(count)


def run_smpplib(port: int, count: int, window: int,
                smsc_pid: int) -> tuple[float, dict[str, float]]:
    import smpplib.client
    import smpplib.consts

    client = smpplib.client.Client("127.0.0.1", port, allow_unknown_opt_params=True)
    answered = [0]
    client.set_message_sent_handler(lambda pdu: answered.__setitem__(0, answered[0] + 1))
    client.connect()
    client.bind_transceiver(system_id=SYSTEM_ID, password=PASSWORD)
    text = b"Running low? Dial *123# for Extra Balance and pay when you recharge."
    started = time.perf_counter()
    sent = 0
    cpu = CpuMeter(smsc_pid).__enter__()
    while sent < count:
        batch = min(window, count - sent)
        for i in range(batch):
            client.send_message(source_addr="1234", destination_addr=f"2012{sent + i:08d}",
                                dest_addr_ton=1, dest_addr_npi=1, short_message=text,
                                registered_delivery=1)
        sent += batch
        while answered[0] < sent:
            client.read_once()
    elapsed_s = time.perf_counter() - started
    cpu.__exit__()
    with contextlib.suppress(Exception):
        client.unbind()
        client.disconnect()
    return count / elapsed_s, cpu.per_message_us(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ads", description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=20_000)
    parser.add_argument("--offers-each", type=int, default=2,
                        help="offers per subscriber; the repeats are suppressed by the caps")
    parser.add_argument("--binds", type=int, default=8)
    parser.add_argument("--bind-rate", type=int, default=2000, help="submit cap per bind, /s")
    parser.add_argument("--ads-rate", type=int, default=16_000, help="ads.send_rate_max_per_s")
    parser.add_argument("--window", type=int, default=50, help="window_max per bind")
    parser.add_argument("--concurrency", type=int, default=800, help="offers in flight")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    proc, port = start_smsc()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ads-") as tmp:
            ours = asyncio.run(run_ours(args, port, Path(tmp), proc.pid))
        raw_count = ours["sent"]
        esme_raw_per_s, esme_raw_cpu = asyncio.run(run_esme_raw(args, port, raw_count, proc.pid))
        smpplib_per_s, smpplib_cpu = run_smpplib(port, raw_count, args.window, proc.pid)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    caps = {"binds": args.binds, "bind_submit_rate_max_per_s": args.bind_rate,
            "binds_total_per_s": args.binds * args.bind_rate,
            "ads_send_rate_max_per_s": args.ads_rate}
    limit = min(caps["binds_total_per_s"], args.ads_rate)
    result = {
        "bench": "ads",
        "ours": ours,
        "esme_raw_per_s": round(esme_raw_per_s),
        "esme_raw_cpu_us_per_sms": esme_raw_cpu,
        "smpplib_per_s": round(smpplib_per_s),
        "smpplib_cpu_us_per_sms": smpplib_cpu,
        "ratio_sent_vs_smpplib": round(ours["sent_per_s"] / smpplib_per_s, 2),
        "ratio_sent_vs_esme_raw": round(ours["sent_per_s"] / esme_raw_per_s, 2),
        "configured_caps": caps,
        "limited_by": ("configured rate caps" if ours["sent_per_s"] >= 0.9 * limit
                       else "CPU (one event loop + the ledger writer thread)"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
