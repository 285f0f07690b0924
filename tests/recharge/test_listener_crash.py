"""A node killed with SIGKILL in the middle of a stream loses no recharge.

The listener runs in a child process whose handler commits each event_id to SQLite
before returning. We kill it while 1,000 recharges are being published, start it
again with the same client id, and check that every event_id is recorded. Duplicates
(events committed but not yet acknowledged when the process died) are counted and
reported: the idempotent handler absorbs them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from simulators.recharge_publisher import RechargePublisher
from tests.mqtt_broker import MosquittoBroker
from tests.recharge.listener_child import open_ledger
from tests.recharge.support import WAIT_MAX_S, make_event, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


def start_child(broker: MosquittoBroker, db_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    log = (db_path.parent / "listener_child.log").open("a")
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.recharge.listener_child",
            "--port",
            str(broker.port),
            "--db",
            str(db_path),
            "--client-id",
            "node-crash-test",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    log.close()
    assert child.stdout is not None
    line = child.stdout.readline()  # blocks until the child's session is up (or it dies)
    if line.strip() != "SUBSCRIBED":
        child.kill()
        pytest.fail(f"listener child did not subscribe (said {line!r}, rc={child.poll()})")
    return child


def counts(db_path: Path) -> tuple[int, int, int]:
    db = sqlite3.connect(db_path)
    try:
        recorded = db.execute("SELECT count(*) FROM recorded").fetchone()[0]
        values = dict(db.execute("SELECT name, value FROM counters").fetchall())
        return recorded, values["deliveries"], values["duplicates"]
    finally:
        db.close()


async def run_crash_scenario(
    broker: MosquittoBroker, tmp_path: Path, total: int, kills: int
) -> int:
    db_path = tmp_path / "ledger.sqlite"
    open_ledger(str(db_path)).close()
    child = start_child(broker, db_path)
    try:
        first_kill_done = asyncio.Event()

        async def publish_all(pub: RechargePublisher) -> int:
            # The second half waits for the first kill, so the node is certainly
            # killed mid-stream, with events still to come while it is down.
            half = total // 2
            sent = await pub.publish_many((make_event(i) for i in range(half)), window_max=10)
            await first_kill_done.wait()
            sent += await pub.publish_many(
                (make_event(i) for i in range(half, total)), window_max=10
            )
            return sent

        async with RechargePublisher(broker.host, broker.port, "in-sim", ack_timeout_s=1.0) as pub:
            publishing = asyncio.create_task(publish_all(pub))
            for round_index in range(kills):
                threshold = total * (round_index + 1) // (kills + 2)
                await wait_until(
                    lambda t=threshold: counts(db_path)[0] >= t, f"{threshold} recorded"
                )
                child.send_signal(signal.SIGKILL)
                child.wait()
                first_kill_done.set()
                child = await asyncio.to_thread(start_child, broker, db_path)
            assert await publishing == total
        await wait_until(
            lambda: counts(db_path)[0] == total, f"all {total} recorded", WAIT_MAX_S * 2
        )
    finally:
        child.kill()
        child.wait()
    db = sqlite3.connect(db_path)
    recorded = {row[0] for row in db.execute("SELECT event_id FROM recorded")}
    db.close()
    assert recorded == {make_event(i).event_id for i in range(total)}, "a recharge was lost"
    _, deliveries, duplicates = counts(db_path)
    assert deliveries == total + duplicates
    return duplicates


async def test_sigkilled_node_loses_no_recharge(broker: MosquittoBroker, tmp_path: Path) -> None:
    duplicates = await run_crash_scenario(broker, tmp_path, total=1000, kills=1)
    print(f"1000 recharges, 1 SIGKILL: 0 lost, {duplicates} duplicate deliveries absorbed")


@pytest.mark.slow
async def test_repeatedly_sigkilled_node_loses_no_recharge(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    duplicates = await run_crash_scenario(broker, tmp_path, total=10_000, kills=5)
    print(f"10000 recharges, 5 SIGKILLs: 0 lost, {duplicates} duplicate deliveries absorbed")
