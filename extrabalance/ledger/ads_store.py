"""The ledger's SQL for advertisement SMS: what was sent (the caps' memory) and
campaigns with their recipients.

Synchronous functions over one open connection, composed by the service layer inside
`Ledger.write(fn)` / `Ledger.read(fn)` like `store.py`. Nothing here decides whether
an ad goes out; `extrabalance.service.ads` does. Timestamps are ISO-8601 UTC text
(`store.ts`), so string order is time order.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from extrabalance.core import sagas
from extrabalance.core.model import SubscriberProfile
from extrabalance.ledger.store import new_id

# Campaign and recipient states (core/sagas.py).
PREPARING = sagas.CAMPAIGN_PREPARING  # recipients being added; not drained yet
QUEUED = sagas.CAMPAIGN_QUEUED
RUNNING = sagas.CAMPAIGN_RUNNING
DONE = sagas.CAMPAIGN_DONE
CANCELLED = sagas.CAMPAIGN_CANCELLED
CAMPAIGN_ACTIVE_STATES = sagas.CAMPAIGN_ACTIVE_STATES
PENDING = sagas.RECIPIENT_PENDING
SENT = sagas.RECIPIENT_SENT
SUPPRESSED = sagas.RECIPIENT_SUPPRESSED

AUDIENCE_CHUNK_MAX = 10_000  # subscriber rows read per audience query


def utc_ts(moment: datetime) -> str:
    """UTC text, whatever zone `moment` carries, so text order is time order."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def parse_ts(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# -- the subscriber as the ad rules see him ------------------------------------------


@dataclass(frozen=True, slots=True)
class AdSubscriberRow:
    profile: SubscriberProfile | None
    ads_opt_out: bool
    barred_manual: bool
    loans_since_full_payback: int
    language: str | None


def load_ad_subscriber(conn: sqlite3.Connection, msisdn: str) -> AdSubscriberRow | None:
    """One indexed read: what the opt-out, bar and segment rules need (no loans)."""
    row = conn.execute(
        "SELECT tenure_days, arpu_minor, attributes, ads_opt_out, barred_manual,"
        " loans_since_full_payback, language FROM subscribers WHERE msisdn = ?",
        (msisdn,),
    ).fetchone()
    if row is None:
        return None
    profile = None
    if row[0] is not None:
        attrs: Mapping[str, str | int] = json.loads(row[2]) if row[2] else {}
        profile = SubscriberProfile(msisdn, row[0], row[1] or 0, attrs)
    return AdSubscriberRow(profile, bool(row[3]), bool(row[4]), int(row[5]), row[6])


# -- the do-not-disturb list --------------------------------------------------------

DND_PAGE_MAX = 10_000  # rows per list page


def dnd_listed(conn: sqlite3.Connection, msisdn: str) -> bool:
    """True when `msisdn` is on the do-not-disturb list (one primary-key lookup)."""
    return conn.execute(
        "SELECT 1 FROM do_not_disturb WHERE msisdn = ?", (msisdn,)
    ).fetchone() is not None


def dnd_add(conn: sqlite3.Connection, msisdns: Iterable[str], source: str, who: str,
            now: datetime) -> int:
    """Put MSISDNs on the list; returns how many were not on it yet."""
    added = 0
    for msisdn in msisdns:
        cur = conn.execute(
            "INSERT INTO do_not_disturb (msisdn, source, added_by, added_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (msisdn) DO NOTHING",
            (msisdn, source, who, utc_ts(now)),
        )
        added += max(int(cur.rowcount), 0)
    return added


def dnd_remove(conn: sqlite3.Connection, msisdn: str) -> bool:
    """Take an MSISDN off the list; False when it was not on it."""
    cur = conn.execute("DELETE FROM do_not_disturb WHERE msisdn = ?", (msisdn,))
    return int(cur.rowcount) > 0


def dnd_page(conn: sqlite3.Connection, after_msisdn: str, limit: int
             ) -> list[tuple[str, str, str, str]]:
    """(msisdn, source, added_by, added_at) after `after_msisdn`, in MSISDN order."""
    rows = conn.execute(
        "SELECT msisdn, source, added_by, added_at FROM do_not_disturb WHERE msisdn > ?"
        " ORDER BY msisdn LIMIT ?",
        (after_msisdn, min(max(limit, 0), DND_PAGE_MAX)),
    ).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


# -- what was sent -------------------------------------------------------------------


def recent_ads(conn: sqlite3.Connection, msisdn: str, since: datetime) -> list[tuple[datetime, str]]:
    """(sent_at, trigger) of this subscriber's ads at or after `since`, oldest first."""
    rows = conn.execute(
        "SELECT sent_at, ad_trigger FROM ads_sent WHERE msisdn = ? AND sent_at >= ?"
        " ORDER BY sent_at",
        (msisdn, utc_ts(since)),
    ).fetchall()
    return [(parse_ts(r[0]), r[1]) for r in rows]


def record_ad(
    conn: sqlite3.Connection,
    msisdn: str,
    trigger: str,
    template: str,
    now: datetime,
    campaign_id: str | None = None,
) -> str:
    ad_id = new_id()
    conn.execute(
        "INSERT INTO ads_sent (ad_id, msisdn, sent_at, ad_trigger, template, campaign_id)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (ad_id, msisdn, utc_ts(now), trigger, template, campaign_id),
    )
    return ad_id


def prune_ads(conn: sqlite3.Connection, before: datetime, limit: int) -> int:
    """Forget ads older than `before` (the caps look back 24 hours; the EDR keeps
    the history). At most `limit` rows per call, so one call never holds the writer."""
    cur = conn.execute(
        "DELETE FROM ads_sent WHERE ad_id IN (SELECT ad_id FROM ads_sent WHERE sent_at < ?"
        " ORDER BY sent_at LIMIT ?)",
        (utc_ts(before), limit),
    )
    return int(cur.rowcount)


# -- campaigns -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CampaignRow:
    campaign_id: str
    template: str
    segment: str | None
    state: str
    recipients: int
    sent: int
    suppressed: int
    created_by: str
    created_at: str

    @property
    def pending(self) -> int:
        return self.recipients - self.sent - self.suppressed


_CAMPAIGN_COLUMNS = (
    "campaign_id, template, segment, state, recipients, sent, suppressed, created_by, created_at"
)


@dataclass(frozen=True, slots=True)
class AudienceRow:
    msisdn: str
    profile: SubscriberProfile
    loans_since_full_payback: int


def audience_chunk(
    conn: sqlite3.Connection, after_msisdn: str, limit: int
) -> list[AudienceRow]:
    """Subscribers with a profile, ads not refused, not barred by the operator, who
    never had a loan credited (a FAILED loan lent nothing); `msisdn > after_msisdn`,
    in MSISDN order, so a caller pages through 30 million rows with bounded memory."""
    rows = conn.execute(
        "SELECT s.msisdn, s.tenure_days, s.arpu_minor, s.attributes,"
        " s.loans_since_full_payback FROM subscribers s"
        " WHERE s.msisdn > ? AND s.tenure_days IS NOT NULL AND s.ads_opt_out = 0"
        " AND s.barred_manual = 0"
        " AND NOT EXISTS (SELECT 1 FROM loans l WHERE l.msisdn = s.msisdn"
        " AND l.state <> 'FAILED')"
        " ORDER BY s.msisdn LIMIT ?",
        (after_msisdn, min(limit, AUDIENCE_CHUNK_MAX)),
    ).fetchall()
    out = []
    for r in rows:
        attrs: Mapping[str, str | int] = json.loads(r[3]) if r[3] else {}
        out.append(AudienceRow(r[0], SubscriberProfile(r[0], r[1], r[2] or 0, attrs), int(r[4])))
    return out


def create_campaign(
    conn: sqlite3.Connection,
    template: str,
    segment: str | None,
    created_by: str,
    now: datetime,
) -> str:
    campaign_id = new_id()[:16]
    conn.execute(
        "INSERT INTO campaigns (campaign_id, template, segment, state, created_by, created_at,"
        " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (campaign_id, template, segment, PREPARING, created_by, utc_ts(now), utc_ts(now)),
    )
    return campaign_id


def add_recipients(
    conn: sqlite3.Connection, campaign_id: str, msisdns: Iterable[str], now: datetime
) -> int:
    stamp = utc_ts(now)
    cur = conn.executemany(
        "INSERT INTO campaign_recipients (campaign_id, msisdn, state, updated_at)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (campaign_id, msisdn) DO NOTHING",
        [(campaign_id, m, PENDING, stamp) for m in msisdns],
    )
    added = int(cur.rowcount)
    conn.execute(
        "UPDATE campaigns SET recipients = recipients + ?, updated_at = ? WHERE campaign_id = ?",
        (added, stamp, campaign_id),
    )
    return added


def get_campaign(conn: sqlite3.Connection, campaign_id: str) -> CampaignRow | None:
    row = conn.execute(
        f"SELECT {_CAMPAIGN_COLUMNS} FROM campaigns WHERE campaign_id = ?", (campaign_id,)
    ).fetchone()
    return CampaignRow(*row) if row else None


def list_campaigns(conn: sqlite3.Connection, limit: int = 50) -> list[CampaignRow]:
    rows = conn.execute(
        f"SELECT {_CAMPAIGN_COLUMNS} FROM campaigns ORDER BY created_at DESC LIMIT ?", (limit,)
    ).fetchall()
    return [CampaignRow(*r) for r in rows]


def active_campaigns(conn: sqlite3.Connection) -> list[CampaignRow]:
    rows = conn.execute(
        f"SELECT {_CAMPAIGN_COLUMNS} FROM campaigns WHERE state IN (?, ?) ORDER BY created_at",
        CAMPAIGN_ACTIVE_STATES,
    ).fetchall()
    return [CampaignRow(*r) for r in rows]


def set_campaign_state(
    conn: sqlite3.Connection, campaign_id: str, state: str, now: datetime
) -> None:
    conn.execute(
        "UPDATE campaigns SET state = ?, updated_at = ? WHERE campaign_id = ?",
        (state, utc_ts(now), campaign_id),
    )


def pending_recipients(conn: sqlite3.Connection, campaign_id: str, limit: int) -> list[str]:
    rows = conn.execute(
        "SELECT msisdn FROM campaign_recipients WHERE campaign_id = ? AND state = ?"
        " ORDER BY msisdn LIMIT ?",
        (campaign_id, PENDING, limit),
    ).fetchall()
    return [r[0] for r in rows]


def claim_recipients(conn: sqlite3.Connection, campaign_id: str, now: datetime,
                     until: datetime, limit: int, *, lock_rows: str = "") -> list[str]:
    """Up to `limit` PENDING recipients of the campaign nobody holds at `now`, in
    MSISDN order, taken for sending until `until`: no other node's drainer takes them
    before then (several nodes on one ledger send each recipient once); a node that
    dies leaves them to the next claim after `until`. On PostgreSQL the adapter chooses
    the rows FOR UPDATE SKIP LOCKED."""
    rows = conn.execute(
        "UPDATE campaign_recipients SET claimed_until = ? WHERE campaign_id = ? AND msisdn IN"
        " (SELECT msisdn FROM campaign_recipients WHERE campaign_id = ? AND state = ?"
        " AND (claimed_until IS NULL OR claimed_until <= ?)"
        f" ORDER BY msisdn LIMIT ?{lock_rows}) RETURNING msisdn",
        (utc_ts(until), campaign_id, campaign_id, PENDING, utc_ts(now), limit),
    ).fetchall()
    return sorted(r[0] for r in rows)


def settle_recipient(
    conn: sqlite3.Connection,
    campaign_id: str,
    msisdn: str,
    state: str,
    reason: str | None,
    now: datetime,
) -> bool:
    """PENDING → SENT / SUPPRESSED, counted once; False if it was already settled."""
    cur = conn.execute(
        "UPDATE campaign_recipients SET state = ?, reason = ?, updated_at = ?"
        " WHERE campaign_id = ? AND msisdn = ? AND state = ?",
        (state, reason, utc_ts(now), campaign_id, msisdn, PENDING),
    )
    if cur.rowcount != 1:
        return False
    column = "sent" if state == SENT else "suppressed"
    conn.execute(
        f"UPDATE campaigns SET {column} = {column} + 1, updated_at = ? WHERE campaign_id = ?",
        (utc_ts(now), campaign_id),
    )
    return True
