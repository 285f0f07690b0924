"""The outbox table: messages to subscribers written in the same transaction as the
money they report, and marked sent by the node's outbox sender afterwards.

What this file owns: the SQL of the four outbox operations of the unit-of-work port
(`outbox_put`, `outbox_due`, `outbox_retry_later`, `outbox_mark_sent`) and
`outbox_prune`, plus the row type. The sending itself (bounds, backoff, the SMSC)
lives in `service/outbox.py`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from extrabalance.ledger.ads_store import parse_ts, utc_ts
from extrabalance.ledger.store import new_id


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One message still to send. `outbox_id` goes to the SMSC with every attempt,
    so a message sent twice (at least once delivery) can be recognised."""

    outbox_id: str
    msisdn: str
    template: str
    params: Mapping[str, str | int]
    kind: str
    language: str
    created_at: datetime
    attempts: int


def outbox_put(
    conn: sqlite3.Connection,
    *,
    msisdn: str,
    template: str,
    params: Mapping[str, str | int],
    kind: str,
    language: str,
    now: datetime,
) -> str:
    """Queue one message, due at once; returns its outbox id."""
    outbox_id = new_id()
    at = utc_ts(now)
    conn.execute(
        "INSERT INTO outbox (outbox_id, msisdn, template, params, kind, language,"
        " created_at, next_attempt_at, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
        (outbox_id, msisdn, template, json.dumps(dict(params), sort_keys=True), kind,
         language, at, at),
    )
    return outbox_id


def outbox_due(conn: sqlite3.Connection, now: datetime, limit: int) -> list[OutboxRow]:
    """Unsent messages whose next attempt is due, oldest first, at most `limit`."""
    rows = conn.execute(
        "SELECT outbox_id, msisdn, template, params, kind, language, created_at, attempts"
        " FROM outbox WHERE sent_at IS NULL AND next_attempt_at <= ?"
        " ORDER BY next_attempt_at, outbox_id LIMIT ?",
        (utc_ts(now), limit),
    ).fetchall()
    return [
        OutboxRow(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], parse_ts(r[6]), int(r[7]))
        for r in rows
    ]


def outbox_claim_due(conn: sqlite3.Connection, now: datetime, until: datetime, limit: int,
                     *, lock_rows: str = "") -> list[OutboxRow]:
    """`outbox_due`, taken for sending: each row returned is not due again before
    `until`, so another node's sender (several nodes on one ledger) does not send it
    too; a node that dies before marking it sent leaves it due again at `until`. On
    PostgreSQL the adapter chooses the rows FOR UPDATE SKIP LOCKED."""
    rows = conn.execute(
        "UPDATE outbox SET next_attempt_at = ? WHERE outbox_id IN (SELECT outbox_id"
        " FROM outbox WHERE sent_at IS NULL AND next_attempt_at <= ?"
        f" ORDER BY next_attempt_at, outbox_id LIMIT ?{lock_rows})"
        " RETURNING outbox_id, msisdn, template, params, kind, language, created_at, attempts",
        (utc_ts(until), utc_ts(now), limit),
    ).fetchall()
    return sorted(
        (OutboxRow(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], parse_ts(r[6]), int(r[7]))
         for r in rows),
        key=lambda row: (row.created_at, row.outbox_id),
    )


def outbox_retry_later(conn: sqlite3.Connection, outbox_id: str, at: datetime) -> None:
    """Count a failed attempt and hold the message back until `at`."""
    conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?"
        " WHERE outbox_id = ? AND sent_at IS NULL",
        (utc_ts(at), outbox_id),
    )


def outbox_mark_sent(conn: sqlite3.Connection, outbox_id: str, now: datetime) -> bool:
    """The SMSC took the message; False if it was marked sent already."""
    cur = conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, sent_at = ?"
        " WHERE outbox_id = ? AND sent_at IS NULL",
        (utc_ts(now), outbox_id),
    )
    return cur.rowcount > 0


def outbox_prune(conn: sqlite3.Connection, before: datetime, limit: int) -> int:
    """Forget messages sent before `before`, at most `limit` per call."""
    cur = conn.execute(
        "DELETE FROM outbox WHERE outbox_id IN (SELECT outbox_id FROM outbox"
        " WHERE sent_at IS NOT NULL AND sent_at < ? ORDER BY sent_at LIMIT ?)",
        (utc_ts(before), limit),
    )
    return int(cur.rowcount)
