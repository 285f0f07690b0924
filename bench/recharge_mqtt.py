"""Benchmark: recharge events through a private Mosquitto, ours against plain aiomqtt.

Measures, in one run and against the same broker configuration:

* publish rate: ``RechargePublisher.publish_many`` (QoS 1, each event awaited until
  PUBACK, retry machinery armed) versus plain ``aiomqtt.Client.publish`` QoS 1 with the
  same number of publishes in flight;
* consume rate: ``RechargeListener`` with a no-op handler (manual PUBACK after the
  handler, in receipt order) versus a plain aiomqtt subscriber that lets paho
  acknowledge on receipt (the library default, which loses messages on a crash).

Both consumers drain the same number of messages queued for their persistent session
while they were offline, timed from connect to the last acknowledgement (for aiomqtt:
the last message received, which it acknowledged on receipt).

Run: ``python -m bench.recharge_mqtt [--messages 20000] [--rounds 5] [--uvloop]``;
prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import structlog

from extrabalance.argparsing import Parser
from extrabalance.mosquitto import MosquittoBroker
from extrabalance.recharge.events import RechargeEvent, to_payload
from extrabalance.recharge.listener import MqttSettings, RechargeListener
from simulators.recharge_publisher import RechargePublisher

TOPIC_PREFIX = "extrabalance/recharge"
DRAIN_TIMEOUT_S = 300.0  # a bound on every wait, so a broken build fails instead of hanging


def events(count: int, in_node: str = "in-a") -> list[RechargeEvent]:
    stamp = datetime(2026, 11, 25, 10, 15, tzinfo=UTC)
    return [
        RechargeEvent(f"{in_node}-{i:09d}", f"2010{i:08d}", 1000, "EGP", 1000, in_node, stamp)
        for i in range(count)
    ]


async def _until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"benchmark gave up waiting for {what}")
        await asyncio.sleep(0.001)


async def publish_ours(broker: MosquittoBroker, batch: list[RechargeEvent], window: int) -> float:
    async with RechargePublisher(broker.host, broker.port, "bench-pub", window_max=window) as pub:
        started = time.perf_counter()
        await pub.publish_many(batch)
        return len(batch) / (time.perf_counter() - started)


async def publish_peer(broker: MosquittoBroker, batch: list[RechargeEvent], window: int) -> float:
    payloads = [(f"{TOPIC_PREFIX}/{e.in_node}", to_payload(e)) for e in batch]
    async with aiomqtt.Client(
        broker.host, broker.port, identifier="bench-peer-pub", max_inflight_messages=window
    ) as client:
        client.pending_calls_threshold = window + 1
        iterator = iter(payloads)

        async def worker() -> None:
            for topic, payload in iterator:
                await client.publish(topic, payload, qos=1)

        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(window):
                group.create_task(worker())
        return len(payloads) / (time.perf_counter() - started)


async def consume_ours(broker: MosquittoBroker, count: int, queue: Any) -> float:
    async def no_op_commit(event: RechargeEvent) -> None:
        return None

    settings = MqttSettings(host=broker.host, port=broker.port, client_id="bench-node")
    listener = RechargeListener(settings, no_op_commit, expected_currency="EGP")
    # First connection creates the persistent session; then the node goes away.
    task = asyncio.create_task(listener.run())
    await _until(lambda: listener.stats()["connected"], "listener session")
    await listener.stop()
    await task
    await queue()  # publish while the node is offline

    listener = RechargeListener(settings, no_op_commit, expected_currency="EGP")
    started = time.perf_counter()
    task = asyncio.create_task(listener.run())
    await _until(lambda: listener.stats()["acked"] >= count, "listener drain")
    elapsed = time.perf_counter() - started
    await listener.stop()
    await task
    return count / elapsed


async def consume_peer(broker: MosquittoBroker, count: int, queue: Any) -> float:
    def client() -> aiomqtt.Client:
        return aiomqtt.Client(
            broker.host, broker.port, identifier="bench-peer-node", clean_session=False
        )

    async with client() as first:
        await first.subscribe(f"{TOPIC_PREFIX}/+", qos=1)
    await queue()

    received = 0
    started = time.perf_counter()
    async with client() as second:
        await second.subscribe(f"{TOPIC_PREFIX}/+", qos=1)
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for _ in second.messages:  # paho has already sent PUBACK
                received += 1
                if received >= count:
                    break
    return count / (time.perf_counter() - started)


async def one_round(directory: Path, count: int, window: int, peer_first: bool) -> dict[str, float]:
    batch = events(count)
    figures: dict[str, float] = {}
    sides = [("ours", consume_ours), ("peer", consume_peer)]
    # Alternate which side runs first, so a machine that warms up or gets busier
    # during a round does not favour one side.
    for name, consume in reversed(sides) if peer_first else sides:
        # A fresh broker per side, so neither inherits the other's queue or sessions.
        broker = MosquittoBroker(directory / f"broker-{name}").start()
        try:
            publish = publish_ours if name == "ours" else publish_peer

            async def queue(
                publish: Any = publish, broker: MosquittoBroker = broker, key: str = name
            ) -> None:
                figures[f"publish_{key}"] = await publish(broker, batch, window)

            figures[f"consume_{name}"] = await consume(broker, count, queue)
        finally:
            broker.kill()
    return figures


def sqlite_commits_per_s(directory: Path, commits: int = 300) -> float:
    """One-row commits per second with the ledger's durability settings (WAL,
    synchronous=FULL): the cost the real handler adds to every recharge, for scale."""
    import sqlite3

    db = sqlite3.connect(directory / "commit-probe.sqlite", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE recorded (event_id TEXT PRIMARY KEY)")
        started = time.perf_counter()
        for i in range(commits):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO recorded VALUES (?)", (f"e{i}",))
            db.execute("COMMIT")
        return commits / (time.perf_counter() - started)
    finally:
        db.close()


def mosquitto_version(binary: str) -> str:
    result = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False)
    first = (result.stdout or result.stderr).splitlines()
    return first[0] if first else "unknown"


async def main(args: argparse.Namespace) -> None:
    # Logs to stderr: stdout is the JSON result.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(30),
    )
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-recharge-") as tmp:
        for index in range(args.rounds):
            rounds.append(
                await one_round(
                    Path(tmp) / f"round-{index}", args.messages, args.window, index % 2 == 1
                )
            )
        binary = MosquittoBroker(Path(tmp) / "probe").binary
        commits_per_s = sqlite_commits_per_s(Path(tmp))

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in rounds), 1)

    def ratio(ours: str, peer: str) -> float:
        # The median of per-round ratios: each ratio compares two runs made
        # back to back, which is robust to a machine whose load changes between rounds.
        return round(statistics.median(r[ours] / r[peer] for r in rounds), 2)

    result = {
        "benchmark": "recharge_mqtt",
        "messages": args.messages,
        "rounds": args.rounds,
        "publish_window": args.window,
        "broker": mosquitto_version(binary),
        "broker_config": "max_queued_messages 0, persistence true, max_inflight_messages 20",
        "python": platform.python_version(),
        "event_loop": "uvloop" if args.uvloop else "asyncio",
        "aiomqtt": _version("aiomqtt"),
        "paho_mqtt": _version("paho-mqtt"),
        "publish_msgs_per_s": {
            "recharge_publisher": median("publish_ours"),
            "aiomqtt_qos1": median("publish_peer"),
            "ratio": ratio("publish_ours", "publish_peer"),
        },
        "consume_msgs_per_s": {
            "recharge_listener_ack_after_handler": median("consume_ours"),
            "aiomqtt_auto_ack": median("consume_peer"),
            "ratio": ratio("consume_ours", "consume_peer"),
        },
        "for_scale_sqlite_fsync_commits_per_s": round(commits_per_s, 1),
        "per_round": [{k: round(v, 1) for k, v in r.items()} for r in rounds],
    }
    print(json.dumps(result, indent=2))


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


def cli(argv: list[str] | None = None) -> int:
    parser = Parser(prog="extrabalance bench recharge",
                    description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=int, default=100, help="publishes in flight")
    parser.add_argument("--uvloop", action="store_true", help="run both sides on uvloop")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.run(main(args))
    else:
        asyncio.run(main(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
