"""Advertisement campaigns: who gets one, queued in the ledger, drained by the node.

What this file owns: choosing the audience (subscribers eligible for Extra Balance
who never borrowed), writing a campaign and its recipients to the ledger, and the
node-side drainer that sends them through the `Advertiser` at the campaign rate.

Why a ledger queue (and not a CLI that binds to the SMSC itself): the operator's
SMSC usually allows a fixed number of binds per system_id, and those belong to the
running node; a campaign in the ledger survives a node restart, is drained by
whichever node runs (several nodes sharing PostgreSQL each take a page of recipients
with a claim — `claim_recipients` — so each recipient is sent by one node; a node that
dies mid-page leaves its unsent recipients to the next claim once its own runs out),
goes through the same caps, quiet hours
and send-rate cap as every other ad, and leaves a per-recipient record (SENT or
SUPPRESSED with the reason). The queue is bounded by the campaign itself: the audience
is fixed when it is created.

During quiet hours the drainer does not send (recipients stay PENDING until the quiet
hours end): a campaign is not "due" at a moment the way a triggered ad is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING

import structlog

from extrabalance.core import sagas
from extrabalance.core.lending import BorrowRequest, Granted, decide
from extrabalance.core.model import SubscriberState
from extrabalance.core.policy import Policy
from extrabalance.core.segments import match_segment
from extrabalance.service.ads import AdTrigger, Advertiser, TokenBucket
from extrabalance.service.unit_of_work import LedgerTx, UnitOfWork

if TYPE_CHECKING:
    from extrabalance.ledger.ads_store import AudienceRow, CampaignRow

log = structlog.get_logger(__name__)

SAMPLE_MAX = 10  # recipients shown by a dry run
CAMPAIGN_RECIPIENTS_MAX = 50_000_000  # bound on one campaign (30 M subscribers + margin)
INSERT_CHUNK = 10_000  # recipients written per ledger transaction
AUDIENCE_PAGE_ROWS = 10_000  # subscribers asked for per audience read (the ledger caps it too)
# A page of recipients is this node's for this long (at least; twice the page's time at
# the campaign rate when that is longer); it stops sending from the page
# CLAIM_MARGIN_SHARE of it before the end (a slow page: the rest goes to the next claim),
# so no other node can have taken a recipient it still sends.
CLAIM_LEASE_S = 120.0
CLAIM_MARGIN_SHARE = 0.25


@dataclass(frozen=True, slots=True)
class Audience:
    count: int
    sample: tuple[str, ...]


def eligible_never_borrowed(row: AudienceRow, policy: Policy, segment: str | None) -> bool:
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


def iter_audience(tx: LedgerTx, policy: Policy, segment: str | None,
                  limit: int | None, chunk: int = AUDIENCE_PAGE_ROWS
                  ) -> Iterator[str]:
    """MSISDNs of the audience in MSISDN order, paged (bounded memory)."""
    after, given = "", 0
    cap = CAMPAIGN_RECIPIENTS_MAX if limit is None else min(limit, CAMPAIGN_RECIPIENTS_MAX)
    while given < cap:
        rows = tx.audience_chunk(after, chunk)
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
        ledger: UnitOfWork,
        advertiser: Advertiser | None,
        policy: Policy,
        clock: Callable[[], datetime],
        *,
        send_rate_max_per_s: float = 50,
        batch_max: int = 500,
        poll_s: float = 5.0,
        claim_lease_s: float | None = None,
    ) -> None:
        self.ledger = ledger
        self.advertiser = advertiser
        self.policy = policy
        self.clock = clock
        self.batch_max = batch_max
        self.poll_s = poll_s
        self.bucket = TokenBucket(send_rate_max_per_s)
        # Long enough for a page at the campaign rate, twice over (a slow rate: longer).
        self.claim_lease = timedelta(seconds=claim_lease_s if claim_lease_s is not None else max(
            CLAIM_LEASE_S, 2 * batch_max / max(send_rate_max_per_s, 1e-3)))

    # -- the operator's side (CLI) ---------------------------------------------------

    async def preview(self, segment: str | None, limit: int | None) -> Audience:
        def count(tx: LedgerTx) -> Audience:
            n, sample = 0, list[str]()
            for msisdn in iter_audience(tx, self.policy, segment, limit):
                n += 1
                if len(sample) < SAMPLE_MAX:
                    sample.append(msisdn)
            return Audience(n, tuple(sample))

        return await self.ledger.read(count)

    async def create(self, template: str, segment: str | None, limit: int | None,
                     created_by: str) -> CampaignRow:
        """Queue a campaign: the audience is fixed now; a running node sends it."""
        now = self.clock()
        campaign_id = await self.ledger.write(
            lambda tx: tx.create_campaign(template, segment, created_by, now))
        # The audience is read a page at a time on a reader connection and written a
        # page per transaction: memory stays bounded and the writer is never held long
        # by a 30-million-row campaign. The campaign stays PREPARING (not drained) until
        # every page is in.
        after, left = "", CAMPAIGN_RECIPIENTS_MAX if limit is None else limit
        while left > 0:
            def page(tx: LedgerTx, start: str = after) -> tuple[list[str], str]:
                rows = tx.audience_chunk(start, INSERT_CHUNK)
                picked = [r.msisdn for r in rows if eligible_never_borrowed(r, self.policy, segment)]
                return picked, rows[-1].msisdn if rows else ""

            picked, after = await self.ledger.read(page)
            picked = picked[:left]
            if picked:
                await self.ledger.write(
                    partial(_add_recipients, campaign_id=campaign_id, msisdns=picked, now=now))
                left -= len(picked)
            if not after:
                break
        await self.ledger.write(lambda tx: tx.set_campaign_state(
            campaign_id, sagas.CAMPAIGN_QUEUED, self.clock()))
        row = await self.ledger.read(lambda tx: tx.get_campaign(campaign_id))
        assert row is not None
        return row

    async def cancel(self, campaign_id: str) -> bool:
        now = self.clock()

        def cancel(tx: LedgerTx) -> bool:
            row = tx.get_campaign(campaign_id)
            if row is None or row.state in (sagas.CAMPAIGN_DONE, sagas.CAMPAIGN_CANCELLED):
                return False
            tx.set_campaign_state(campaign_id, sagas.CAMPAIGN_CANCELLED, now)
            return True

        return await self.ledger.write(cancel)

    async def list(self) -> list[CampaignRow]:
        return await self.ledger.read(lambda tx: tx.list_campaigns())

    # -- the node's side: draining --------------------------------------------------

    async def drain_once(self) -> int:
        """Send up to `batch_max` recipients of the oldest active campaign, at the
        campaign rate; returns how many were decided (0: nothing to do now)."""
        assert self.advertiser is not None, "draining needs the node's Advertiser"
        now = self.clock()
        if self.advertiser.ads.in_quiet_hours(now):
            return 0
        campaigns = await self.ledger.read(lambda tx: tx.active_campaigns())
        if not campaigns:
            return 0
        campaign = campaigns[0]
        until = now + self.claim_lease
        send_until = until - self.claim_lease * CLAIM_MARGIN_SHARE
        msisdns = await self.ledger.write(partial(
            _claim_recipients, campaign_id=campaign.campaign_id, now=now, until=until,
            limit=self.batch_max))
        if not msisdns:
            # Nothing free: done, unless another node still holds recipients it sends.
            if not await self.ledger.read(
                    lambda tx: tx.pending_recipients(campaign.campaign_id, 1)):
                await self.ledger.write(lambda tx: tx.set_campaign_state(
                    campaign.campaign_id, sagas.CAMPAIGN_DONE, now))
                log.info("campaign_done", campaign_id=campaign.campaign_id)
            return 0
        if campaign.state == sagas.CAMPAIGN_QUEUED:
            await self.ledger.write(lambda tx: tx.set_campaign_state(
                campaign.campaign_id, sagas.CAMPAIGN_RUNNING, now))
        decided = 0
        for msisdn in msisdns:
            # Wait for a token of the campaign's own rate and of the node's ad rate:
            # a campaign never pushes triggered ads over the rate cap.
            while not self.bucket.take():
                await asyncio.sleep(self.bucket.wait_s())
            while not self.advertiser.bucket.take():
                await asyncio.sleep(self.advertiser.bucket.wait_s())
            moment = self.clock()
            if self.advertiser.ads.in_quiet_hours(moment) or moment >= send_until:
                break  # the rest of the page stays PENDING for the next claim
            verdict = await self.advertiser.offer(
                msisdn, AdTrigger.CAMPAIGN, template=campaign.template,
                campaign_id=campaign.campaign_id, rate_checked=True)
            state = sagas.RECIPIENT_SENT if verdict.send else sagas.RECIPIENT_SUPPRESSED
            settled_at = self.clock()
            await self.ledger.write(partial(
                _settle_recipient, campaign_id=campaign.campaign_id, msisdn=msisdn, state=state,
                reason=verdict.reason or None, now=settled_at))
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


def _add_recipients(tx: LedgerTx, *, campaign_id: str, msisdns: list[str], now: datetime) -> int:
    return tx.add_recipients(campaign_id, msisdns, now)


def _claim_recipients(tx: LedgerTx, *, campaign_id: str, now: datetime, until: datetime,
                      limit: int) -> list[str]:
    return tx.claim_recipients(campaign_id, now, until, limit)


def _settle_recipient(tx: LedgerTx, *, campaign_id: str, msisdn: str, state: str,
                      reason: str | None, now: datetime) -> bool:
    return tx.settle_recipient(campaign_id, msisdn, state, reason, now)
