"""A node stand-in for the crash test, run as a child process and killed with SIGKILL.

Its handler records each event_id in SQLite (WAL, synchronous=FULL) and commits before
returning, which is the contract the real ledger keeps; a duplicate delivery is counted
and otherwise ignored, which is the idempotency the real ledger provides.
Prints ``SUBSCRIBED`` once its persistent session is up.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys

import structlog

from extrabalance.recharge.events import RechargeEvent
from extrabalance.recharge.listener import MqttSettings, RechargeListener

SCHEMA = """
CREATE TABLE IF NOT EXISTS recorded (event_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('deliveries', 0), ('duplicates', 0);
"""


def open_ledger(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    return db


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--client-id", required=True)
    args = parser.parse_args()
    # stdout carries the SUBSCRIBED handshake; logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    db = open_ledger(args.db)

    async def handle(event: RechargeEvent) -> None:
        # One transaction per event, committed before we return (then the PUBACK).
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE counters SET value = value + 1 WHERE name = 'deliveries'")
        inserted = db.execute(
            "INSERT OR IGNORE INTO recorded VALUES (?)", (event.event_id,)
        ).rowcount
        if inserted == 0:
            db.execute("UPDATE counters SET value = value + 1 WHERE name = 'duplicates'")
        db.execute("COMMIT")

    settings = MqttSettings(
        port=args.port,
        client_id=args.client_id,
        reconnect_backoff_initial_s=0.05,
        reconnect_backoff_max_s=0.3,
    )
    listener = RechargeListener(settings, handle, expected_currency="EGP")
    task = asyncio.create_task(listener.run())
    while not listener.stats()["connected"]:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    print("SUBSCRIBED", flush=True)
    await task


if __name__ == "__main__":
    asyncio.run(main())
