"""How much more CPU the same Python work costs when it arrives paced than back to back.

The node's CPU per loan is about twice as high at a few hundred loans a second as at
saturation, with the same functions in the same proportions (docs/benchmarks.md, "CPU
per loan below saturation"). This benchmark asks the machine alone, with no network,
no threads and no database: one event is a fixed slice of the node's own work (build
a USSD menu submit_sm, encode it, decode it; 20 times), run from an asyncio loop
(uvloop) either at a paced rate, sleeping between events, or back to back. It reports
CPU microseconds per event at each rate and the ratio to the back-to-back cost.

A ratio near 1 means the machine runs an event as fast after an idle wait as in a busy
loop; a shared virtual machine whose vCPU halts while idle has been measured at about
2 at 200 events/s. Capacity measured at saturation then overstates what a node does
within a latency target at lower rates on that machine.

Run: ``python -m bench.idle_penalty [--seconds 4] [--rounds 2]
[--rates 200,500,1000,2000] [--saturated-events 20000]``. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
from collections.abc import Sequence

from extrabalance.bench import machine
from extrabalance.smpp.pdu import decode, encode
from extrabalance.smpp.ussd import ussd_submit

MENU = "1. Borrow 10.00\n2. Borrow 20.00\n3. Borrow 50.00\n4. My balance"
PDUS_PER_EVENT = 20
SATURATED_EVENTS = 20_000


def _event() -> None:
    for i in range(PDUS_PER_EVENT):
        decode(encode(ussd_submit(f"201000000{i:03d}", "1234", MENU)))


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _paced_us(rate: float, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    events = max(1, int(rate * seconds))
    start, cpu0 = loop.time(), _cpu_s()
    for k in range(events):
        delay = start + k / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        _event()
    return (_cpu_s() - cpu0) / events * 1e6


def _saturated_us(events: int) -> float:
    cpu0 = _cpu_s()
    for _ in range(events):
        _event()
    return (_cpu_s() - cpu0) / events * 1e6


async def _run(rates: Sequence[float], seconds: float, rounds: int,
               saturated_events: int) -> dict[str, object]:
    paced: dict[float, list[float]] = {rate: [] for rate in rates}
    saturated: list[float] = []
    for _ in range(rounds):  # interleaved, so that a change in machine load hits all
        for rate in rates:
            paced[rate].append(await _paced_us(rate, seconds))
        saturated.append(_saturated_us(saturated_events))
    base = statistics.median(saturated)
    return {
        "benchmark": "idle_penalty",
        "machine": machine(),
        "event": f"{PDUS_PER_EVENT} USSD submit_sm built, encoded and decoded",
        "saturated_cpu_us_per_event": [round(v, 1) for v in saturated],
        "paced_cpu_us_per_event": {
            f"{rate:g}/s": [round(v, 1) for v in values] for rate, values in paced.items()
        },
        "ratio_to_saturated": {
            f"{rate:g}/s": round(statistics.median(values) / base, 2)
            for rate, values in paced.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per paced rate and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rates", default="200,500,1000,2000",
                        help="paced rates in events/s, comma-separated")
    parser.add_argument("--saturated-events", type=int, default=SATURATED_EVENTS,
                        help="events run back to back per round")
    args = parser.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates: not a comma-separated list of numbers: {args.rates!r}")
    if (not rates or any(r <= 0 for r in rates) or args.seconds <= 0 or args.rounds < 1
            or args.saturated_events < 1):
        parser.error("--rates must be positive, --seconds > 0, --rounds and"
                     " --saturated-events >= 1")
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    result = runner(_run(rates, args.seconds, args.rounds, args.saturated_events))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
