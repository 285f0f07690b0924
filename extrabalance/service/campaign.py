"""Advertisement campaigns: who gets one, queued in the ledger, drained by the node.

What this file owns: choosing the audience (subscribers eligible for Extra Balance
who never borrowed), writing a campaign and its recipients to the ledger, and the
node-side drainer that sends them through the `Advertiser` at the campaign rate.

Why a ledger queue (and not a CLI that binds to the SMSC itself): the operator's
SMSC usually allows a fixed number of binds per system_id, and those belong to the
running node; a campaign in the ledger survives a node restart, is drained by
whichever node runs (several nodes sharing PostgreSQL each take a recipient once —
`settle_recipient` only moves PENDING rows), goes through the same caps, quiet hours
and send-rate cap as every other ad, and leaves a per-recipient record (SENT or
SUPPRESSED with the reason). The queue is bounded by the campaign itself: the audience
is fixed when it is created.

During quiet hours the drainer does not send (recipients stay PENDING until the quiet
hours end): a campaign is not "due" at a moment the way a triggered ad is.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from extrabalance.clock import SYSTEM_CLOCK
from extrabalance.core.lending import BorrowRequest, Granted, decide
from extrabalance.core.model import SubscriberState
from extrabalance.core.policy import Policy
from extrabalance.core.segments import match_segment
from extrabalance.ledger import Ledger, ads_store
from extrabalance.service.ads import AdTrigger, Advertiser, TokenBucket

log = structlog.get_logger(__name__)

SAMPLE_MAX = 10  # recipients shown by a dry run
CAMPAIGN_RECIPIENTS_MAX = 50_000_000  # bound on one campaign (30 M subscribers + margin)
INSERT_CHUNK = 10_000  # recipients written per ledger transaction


@dataclass(frozen=True, slots=True)
class Audience:
    count: int
    sample: tuple[str, ...]


def eligible_never_borrowed(row: ads_store.AudienceRow, policy: Policy, segment: str | None) -> bool:
    """Would `decide` lend this subscriber the smallest tier now? (Bars, tenure,
    segment, ceiling — the same rules as a real request.)"""
    matched = match_segment(row.profile, policy.segments)
    if matched is None or (segment is not None and matched.name != segment):
        return False
    state = SubscriberState(row.msisdn, row.profile,
                            loans_since_full_payback=row.loans_since_full_payback)
    smallest = min(matched.tier_ids, key=lambda t: policy.tiers[t].amount_minor
                   if t in policy.tiers else 1 << 62)
    return isinstance(decide(BorrowRequest(row.msisdn, smallest, "ussd"), state, policy,
                             datetime.min), Granted)


def iter_audience(conn: sqlite3.Connection, policy: Policy, segment: str | None,
                  limit: int | None, chunk: int = ads_store.AUDIENCE_CHUNK_MAX
                  ) -> Iterator[str]:
    """MSISDNs of the audience in MSISDN order, paged (bounded memory)."""
    after, given = "", 0
    cap = CAMPAIGN_RECIPIENTS_MAX if limit is None else min(limit, CAMPAIGN_RECIPIENTS_MAX)
    while given < cap:
        rows = ads_store.audience_chunk(conn, after, chunk)
        if not rows:
            return
        for row in rows:
            if eligible_never_borrowed(row, policy, segment):
                yield row.msisdn
                given += 1
                if given >= cap:
                    return
        after = rows[-1].msisdn


class CampaignService:
    def __init__(
        self,
        ledger: Ledger,
        advertiser: Advertiser | None,
        policy: Policy,
        clock: Callable[[], datetime],
        *,
        send_rate_max_per_s: float = 50,
        batch_max: int = 500,
        poll_s: float = 5.0,
    ) -> None:
        self.ledger = ledger
        self.advertiser = advertiser
        self.policy = policy
        self.clock = clock
        self.batch_max = batch_max
        self.poll_s = poll_s
        self.bucket = TokenBucket(send_rate_max_per_s)

    # -- the operator's side (CLI) ---------------------------------------------------

    async def preview(self, segment: str | None, limit: int | None) -> Audience:
        def count(conn: sqlite3.Connection) -> Audience:
            n, sample = 0, list[str]()
            for msisdn in iter_audience(conn, self.policy, segment, limit):
                n += 1
                if len(sample) < SAMPLE_MAX:
                    sample.append(msisdn)
            return Audience(n, tuple(sample))

        return await self.ledger.read(count)

    async def create(self, template: str, segment: str | None, limit: int | None,
                     created_by: str) -> ads_store.CampaignRow:
        """Queue a campaign: the audience is fixed now; a running node sends it."""
        now = self.clock()
        campaign_id = await self.ledger.write(
            lambda conn: ads_store.create_campaign(conn, template, segment, created_by, now))
        # The audience is read a page at a time on a reader connection and written a
        # page per transaction: memory stays bounded and the writer is never held long
        # by a 30-million-row campaign. The campaign stays PREPARING (not drained) until
        # every page is in.
        after, left = "", CAMPAIGN_RECIPIENTS_MAX if limit is None else limit
        while left > 0:
            def page(conn: sqlite3.Connection, start: str = after) -> tuple[list[str], str]:
                rows = ads_store.audience_chunk(conn, start, INSERT_CHUNK)
                picked = [r.msisdn for r in rows if eligible_never_borrowed(r, self.policy, segment)]
                return picked, rows[-1].msisdn if rows else ""

            picked, after = await self.ledger.read(page)
            picked = picked[:left]
            if picked:
                await self.ledger.write(
                    lambda conn, c=picked: ads_store.add_recipients(conn, campaign_id, c, now))
                left -= len(picked)
            if not after:
                break
        await self.ledger.write(lambda conn: ads_store.set_campaign_state(
            conn, campaign_id, ads_store.QUEUED, self.clock()))
        row = await self.ledger.read(lambda conn: ads_store.get_campaign(conn, campaign_id))
        assert row is not None
        return row

    async def cancel(self, campaign_id: str) -> bool:
        now = self.clock()

        def cancel(conn: sqlite3.Connection) -> bool:
            row = ads_store.get_campaign(conn, campaign_id)
            if row is None or row.state in (ads_store.DONE, ads_store.CANCELLED):
                return False
            ads_store.set_campaign_state(conn, campaign_id, ads_store.CANCELLED, now)
            return True

        return await self.ledger.write(cancel)

    async def list(self) -> list[ads_store.CampaignRow]:
        return await self.ledger.read(ads_store.list_campaigns)

    # -- the node's side: draining --------------------------------------------------

    async def drain_once(self) -> int:
        """Send up to `batch_max` recipients of the oldest active campaign, at the
        campaign rate; returns how many were decided (0: nothing to do now)."""
        assert self.advertiser is not None, "draining needs the node's Advertiser"
        now = self.clock()
        if self.advertiser.ads.in_quiet_hours(now):
            return 0
        campaigns = await self.ledger.read(ads_store.active_campaigns)
        if not campaigns:
            return 0
        campaign = campaigns[0]
        msisdns = await self.ledger.read(
            lambda conn: ads_store.pending_recipients(conn, campaign.campaign_id, self.batch_max))
        if not msisdns:
            await self.ledger.write(lambda conn: ads_store.set_campaign_state(
                conn, campaign.campaign_id, ads_store.DONE, now))
            log.info("campaign_done", campaign_id=campaign.campaign_id)
            return 0
        if campaign.state == ads_store.QUEUED:
            await self.ledger.write(lambda conn: ads_store.set_campaign_state(
                conn, campaign.campaign_id, ads_store.RUNNING, now))
        decided = 0
        for msisdn in msisdns:
            # Wait for a token of the campaign's own rate and of the node's ad rate:
            # a campaign never pushes triggered ads over the rate cap.
            while not self.bucket.take():
                await asyncio.sleep(self.bucket.wait_s())
            while not self.advertiser.bucket.take():
                await asyncio.sleep(self.advertiser.bucket.wait_s())
            if self.advertiser.ads.in_quiet_hours(self.clock()):
                break
            verdict = await self.advertiser.offer(
                msisdn, AdTrigger.CAMPAIGN, template=campaign.template,
                campaign_id=campaign.campaign_id, rate_checked=True)
            state = ads_store.SENT if verdict.send else ads_store.SUPPRESSED
            settled_at = self.clock()
            await self.ledger.write(lambda conn, m=msisdn, s=state, r=verdict.reason, t=settled_at:
                                    ads_store.settle_recipient(conn, campaign.campaign_id, m, s,
                                                               r or None, t))
            decided += 1
        return decided

    async def run_forever(self) -> None:
        while True:
            try:
                decided = await self.drain_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("campaign_drain_failed")
                decided = 0
            if decided == 0:
                await asyncio.sleep(self.poll_s)


# -- `extrabalance campaign` ------------------------------------------------------------


def campaign_command(
    settings: Any,
    *,
    template: str | None,
    segment: str | None,
    dry_run: bool,
    limit: int | None,
    list_only: bool = False,
    cancel: str | None = None,
    who: str = "cli",
    json_output: bool = False,
    out: Any = None,
) -> int:
    """The CLI: preview (dry run), queue, list or cancel campaigns in the node's ledger.
    Exit codes: 0 done, 2 bad arguments."""
    import json
    import sys

    from extrabalance.observability import mask_msisdn

    out = out or sys.stdout
    policy = settings.policy()
    if segment is not None and segment not in {s.name for s in policy.segments}:
        print(f"extrabalance campaign: no segment named {segment!r}", file=sys.stderr)
        return 2
    if limit is not None and limit < 1:
        print("extrabalance campaign: --limit must be at least 1", file=sys.stderr)
        return 2
    if not (list_only or cancel):
        missing = [lang for lang, table in settings.templates.items() if template not in table]
        if template is None or missing:
            print(f"extrabalance campaign: template {template!r} is missing in "
                  f"[templates.{', '.join(missing) or '?'}]", file=sys.stderr)
            return 2

    def show(msisdn: str) -> str:
        return mask_msisdn(msisdn) if settings.node.mask_msisdn_in_logs else msisdn

    async def main() -> int:
        ledger = Ledger(settings.storage.path)
        try:
            service = CampaignService(ledger, None, policy, SYSTEM_CLOCK.now,
                                      send_rate_max_per_s=settings.ads.campaign.send_rate_max_per_s)
            if list_only:
                rows = await service.list()
                if json_output:
                    print(json.dumps([_row(r) for r in rows]), file=out)
                for r in rows if not json_output else ():
                    print(f"{r.campaign_id}  {r.state:<9} {r.template:<16} "
                          f"segment={r.segment or '*'}  recipients={r.recipients} sent={r.sent} "
                          f"suppressed={r.suppressed} pending={r.pending}  {r.created_at}", file=out)
                return 0
            if cancel:
                done = await service.cancel(cancel)
                print(f"campaign {cancel}: {'cancelled' if done else 'not active (or unknown)'}",
                      file=out)
                return 0 if done else 2
            audience = await service.preview(segment, limit)
            rate = settings.ads.campaign.send_rate_max_per_s
            if dry_run:
                if json_output:
                    print(json.dumps({"count": audience.count, "template": template,
                                      "segment": segment, "limit": limit,
                                      "sample": [show(m) for m in audience.sample]}), file=out)
                else:
                    print(f"{audience.count} subscribers would get {template!r} "
                          f"(segment {segment or 'any'}, limit {limit or 'none'}); dry run, "
                          f"nothing queued.", file=out)
                    for m in audience.sample:
                        print(f"  {show(m)}", file=out)
                    print(f"At {rate}/s that takes about {audience.count / rate / 60:.1f} "
                          f"minutes of sending outside quiet hours.", file=out)
                return 0
            row = await service.create(template or "", segment, limit, who)
            if json_output:
                print(json.dumps(_row(row)), file=out)
            else:
                print(f"campaign {row.campaign_id} queued: {row.recipients} recipients, "
                      f"template {template!r}. A running node sends it at up to {rate}/s "
                      f"outside quiet hours; caps and opt-outs still apply per recipient. "
                      f"Follow it with `extrabalance campaign --list`.", file=out)
            return 0
        finally:
            await ledger.close()

    return asyncio.run(main())


def _row(row: ads_store.CampaignRow) -> dict[str, Any]:
    return {"campaign_id": row.campaign_id, "template": row.template, "segment": row.segment,
            "state": row.state, "recipients": row.recipients, "sent": row.sent,
            "suppressed": row.suppressed, "pending": row.pending, "created_by": row.created_by,
            "created_at": row.created_at}
