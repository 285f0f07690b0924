"""Advertisement SMS: the right subscriber, at the right moment, never spammed.

What this file owns:

* `AdPolicy` — the rules as a pure object over plain data: given the subscriber
  (`AdSubject`), the trigger, his ads of the last 24 hours and the time, it says
  send (with the template) or suppress (with the reason). No IO, no clock.
* `TokenBucket` — the node's global send-rate cap (ads per second).
* `Advertiser` — the use case: load the subject and his recent ads, decide, and
  record the ad in the *same* ledger transaction (so two triggers for one subscriber,
  even on two nodes sharing the ledger, can never both pass a cap), then submit it
  through the `Notifier` and write the EDR / metrics for every ad sent or suppressed.

Rules, in the order they are checked (the first that fails names the reason):
`disabled` (ads or this trigger off) → `opted_out` (STOP ADS / USSD menu) → `barred`
(manual bar or bad-debt count at the segment limit) → `quiet_hours` (operator's time
zone) → `cap_day` (ads in any 24 hours) → `cap_trigger` (this trigger's own cap) →
`cap_interval` (min seconds between two ads) → `rate` (global token bucket, or too
many ads already waiting for the SMSC). An ad that is suppressed is dropped, never
queued: an offer that is late is worse than none, and a queue would grow without
bound in exactly the moments (network-wide outage, quiet hours) when it fills.

An ad is recorded as sent *before* it is submitted: if the node dies in between, the
subscriber misses one ad rather than getting two.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import structlog

from extrabalance.core.policy import Policy
from extrabalance.core.segments import match_segment
from extrabalance.service.ports import EventSink, Notice, Notifier
from extrabalance.service.unit_of_work import LedgerTx, UnitOfWork

if TYPE_CHECKING:
    from extrabalance.ledger.ads_store import AdSubscriberRow

log = structlog.get_logger(__name__)

CAP_WINDOW = timedelta(hours=24)  # "per day" = any 24 hours, not a calendar day
BACKGROUND_TASKS_MAX = 10_000  # fire-and-forget ad offers in flight; beyond: suppressed
PRUNE_BATCH_MAX = 10_000  # ads_sent rows deleted per housekeeping step


class AdTrigger(str, Enum):
    OUT_OF_BALANCE = "out_of_balance"  # the IN's CCR answered 4012
    LOW_BALANCE = "low_balance"  # MQTT extrabalance/lowbalance/<in_node>
    DEBT_LIMIT = "debt_limit"  # a loan brought debt to a share of the ceiling
    CAMPAIGN = "campaign"  # `extrabalance campaign`

    @property
    def template(self) -> str:
        return f"ad_{self.value}"


class Suppressed(str, Enum):
    DISABLED = "disabled"
    OPTED_OUT = "opted_out"
    DO_NOT_DISTURB = "do_not_disturb"  # on the operator's do-not-disturb list
    BARRED = "barred"
    QUIET_HOURS = "quiet_hours"
    CAP_DAY = "cap_day"
    CAP_TRIGGER = "cap_trigger"
    CAP_INTERVAL = "cap_interval"
    RATE = "rate"


@dataclass(frozen=True, slots=True)
class AdVerdict:
    send: bool
    reason: str = ""  # a `Suppressed` value when not sent
    template: str = ""
    replayed: bool = False  # the same event was decided before; nothing done now


@dataclass(frozen=True, slots=True)
class AdRules:
    """The [ads] config as plain data."""

    enabled: bool = True
    max_per_day: int = 2
    min_interval_s: int = 3600
    trigger_max_per_day: Mapping[AdTrigger, int] = field(default_factory=dict)
    triggers_disabled: frozenset[AdTrigger] = frozenset()
    quiet_start_min: int | None = None  # minutes after local midnight
    quiet_end_min: int | None = None
    timezone: str = "UTC"
    send_rate_max_per_s: int = 200
    rate_burst: int | None = None  # None: one second's worth
    inflight_max: int = 100
    debt_limit_share_bp: int = 8000
    # segment name -> {base template -> template key}
    segment_templates: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SentAd:
    sent_at: datetime
    trigger: AdTrigger | str


@dataclass(frozen=True, slots=True)
class AdSubject:
    msisdn: str
    opted_out: bool = False
    barred: bool = False
    segment: str | None = None
    language: str = "en"
    do_not_disturb: bool = False  # on the do-not-disturb list: never an ad


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def rules_from_settings(settings: Any) -> AdRules:
    """`extrabalance.config.Settings` → `AdRules` (kept here so config stays plain)."""
    ads = settings.ads
    quiet = ads.quiet_hours
    return AdRules(
        enabled=ads.enabled,
        max_per_day=ads.max_per_day,
        min_interval_s=ads.min_interval_s,
        trigger_max_per_day={
            AdTrigger(name): t.max_per_day
            for name, t in ads.triggers.items()
            if t.max_per_day is not None
        },
        triggers_disabled=frozenset(
            AdTrigger(name) for name, t in ads.triggers.items() if not t.enabled
        ),
        quiet_start_min=_minutes(quiet.start) if quiet else None,
        quiet_end_min=_minutes(quiet.end) if quiet else None,
        timezone=settings.node.timezone,
        send_rate_max_per_s=ads.send_rate_max_per_s,
        rate_burst=ads.rate_burst,
        inflight_max=ads.inflight_max,
        debt_limit_share_bp=ads.debt_limit_share_bp,
        segment_templates={k: dict(v) for k, v in ads.segment_templates.items()},
    )


class AdPolicy:
    """Pure decisions: no IO, no clock (time is an argument)."""

    def __init__(self, rules: AdRules) -> None:
        self.rules = rules
        self._tz = ZoneInfo(rules.timezone)

    def in_quiet_hours(self, now: datetime) -> bool:
        r = self.rules
        if r.quiet_start_min is None or r.quiet_end_min is None:
            return False
        local = now.astimezone(self._tz)
        minute = local.hour * 60 + local.minute
        start, end = r.quiet_start_min, r.quiet_end_min
        if start == end:
            return False
        if start < end:
            return start <= minute < end
        return minute >= start or minute < end  # the quiet span crosses midnight

    def template_for(
        self, trigger: AdTrigger, segment: str | None, template: str | None = None
    ) -> str:
        base = template or trigger.template
        overrides = self.rules.segment_templates.get(segment or "", {})
        return overrides.get(base, base)

    def debt_limit_crossed(
        self, ceiling_minor: int, debt_before_minor: int, debt_after_minor: int
    ) -> bool:
        """True when this loan took the debt from below the share to at or above it."""
        threshold_minor = self.debt_threshold(ceiling_minor)
        return debt_before_minor < threshold_minor <= debt_after_minor

    def debt_threshold(self, ceiling_minor: int) -> int:
        """The debt at which the debt-limit ad fires: the share of the ceiling, rounded up."""
        return -(-ceiling_minor * self.rules.debt_limit_share_bp // 10_000)

    def decide(
        self,
        subject: AdSubject,
        trigger: AdTrigger,
        history: Sequence[SentAd],
        now: datetime,
        *,
        template: str | None = None,
    ) -> AdVerdict:
        """Send or suppress one ad (every rule except the send rate)."""
        r = self.rules
        chosen = self.template_for(trigger, subject.segment, template)

        def no(reason: Suppressed) -> AdVerdict:
            return AdVerdict(False, reason.value, chosen)

        if not r.enabled or trigger in r.triggers_disabled:
            return no(Suppressed.DISABLED)
        if subject.do_not_disturb:
            return no(Suppressed.DO_NOT_DISTURB)
        if subject.opted_out:
            return no(Suppressed.OPTED_OUT)
        if subject.barred:
            return no(Suppressed.BARRED)
        if self.in_quiet_hours(now):
            return no(Suppressed.QUIET_HOURS)
        since = now - CAP_WINDOW
        recent = [h for h in history if h.sent_at > since]
        if len(recent) >= r.max_per_day:
            return no(Suppressed.CAP_DAY)
        trigger_cap = r.trigger_max_per_day.get(trigger)
        if trigger_cap is not None:
            same = sum(1 for h in recent if _trigger_value(h.trigger) == trigger.value)
            if same >= trigger_cap:
                return no(Suppressed.CAP_TRIGGER)
        if recent:
            last = max(h.sent_at for h in recent)
            if (now - last).total_seconds() < r.min_interval_s:
                return no(Suppressed.CAP_INTERVAL)
        return AdVerdict(True, "", chosen)


def _trigger_value(trigger: AdTrigger | str) -> str:
    return trigger.value if isinstance(trigger, AdTrigger) else trigger


class TokenBucket:
    """`rate_per_s` tokens a second, at most `burst` saved up. Thread-safe: the ledger's
    writer thread and the event loop both take tokens."""

    def __init__(
        self, rate_per_s: float, burst: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst if burst is not None else max(rate_per_s, 1))
        self._monotonic = monotonic
        self._tokens = self.burst
        self._at = monotonic()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now

    def take(self) -> bool:
        with self._lock:
            self._refill()
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False

    def wait_s(self) -> float:
        """Seconds until one token is there (0 if one is)."""
        with self._lock:
            self._refill()
            return max(0.0, (1 - self._tokens) / self.rate_per_s)


def subject_from_row(
    msisdn: str, row: AdSubscriberRow | None, policy: Policy, default_language: str
) -> AdSubject:
    if row is None:
        return AdSubject(msisdn, language=default_language)
    segment = match_segment(row.profile, policy.segments)
    barred = row.barred_manual or (
        segment is not None and row.loans_since_full_payback >= segment.bad_debt_limit
    )
    return AdSubject(
        msisdn,
        opted_out=row.ads_opt_out,
        barred=barred,
        segment=segment.name if segment else None,
        language=row.language or default_language,
    )


@dataclass(frozen=True, slots=True)
class AdRequest:
    msisdn: str
    trigger: AdTrigger
    template: str | None = None  # a campaign's own template; else the trigger's
    campaign_id: str | None = None
    idempotency_key: str | None = None  # e.g. the low-balance event_id
    rate_checked: bool = False  # the caller already took a token (campaign drainer)


@dataclass(frozen=True, slots=True)
class AdDecision:
    verdict: AdVerdict
    language: str


def decide_and_record(
    tx: LedgerTx,
    ads: AdPolicy,
    policy: Policy,
    request: AdRequest,
    now: datetime,
    *,
    take_token: Callable[[], bool],
    default_language: str = "en",
) -> AdDecision:
    """One ledger transaction: read the subject and his last 24 hours of ads, decide,
    take a rate token, and record the ad when it is to be sent."""
    if request.idempotency_key is not None:
        prior = tx.idempotent_get(request.idempotency_key)
        if prior is not None:
            return AdDecision(
                AdVerdict(bool(prior["send"]), prior["reason"], prior["template"], True),
                prior.get("language", default_language),
            )
    row = tx.load_ad_subscriber(request.msisdn)
    subject = subject_from_row(request.msisdn, row, policy, default_language)
    if tx.dnd_listed(request.msisdn):
        subject = replace(subject, do_not_disturb=True)
    history = [SentAd(at, trig) for at, trig in
               tx.recent_ads(request.msisdn, now - CAP_WINDOW)]
    verdict = ads.decide(subject, request.trigger, history, now, template=request.template)
    if verdict.send and not request.rate_checked and not take_token():
        verdict = AdVerdict(False, Suppressed.RATE.value, verdict.template)
    if verdict.send:
        tx.record_ad(request.msisdn, request.trigger.value, verdict.template, now,
                            request.campaign_id)
    if request.idempotency_key is not None:
        tx.idempotent_put(request.idempotency_key, {
            "send": verdict.send, "reason": verdict.reason, "template": verdict.template,
            "language": subject.language}, now)
    return AdDecision(verdict, subject.language)


class Advertiser:
    """The ad use case. Every offer ends in exactly one `ad_sent` or `ad_suppressed`
    event (EDR + metrics), except a replayed event, which ends in none."""

    def __init__(
        self,
        ledger: UnitOfWork,
        notifier: Notifier,
        events: EventSink,
        policy: Policy,
        rules: AdRules,
        clock: Callable[[], datetime],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        default_language: str = "en",
        background_tasks_max: int = BACKGROUND_TASKS_MAX,
    ) -> None:
        self.ledger = ledger
        self.notifier = notifier
        self.events = events
        self.policy = policy
        self.clock = clock
        self.default_language = default_language
        self._monotonic = monotonic
        self.background_tasks_max = background_tasks_max
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inflight = 0
        self.set_rules(rules, policy)

    def set_rules(self, rules: AdRules, policy: Policy | None = None) -> None:
        """Config reload: the next decision uses the new rules and rate."""
        self.ads = AdPolicy(rules)
        self.rules = rules
        self.bucket = TokenBucket(rules.send_rate_max_per_s, rules.rate_burst, self._monotonic)
        if policy is not None:
            self.policy = policy

    # -- offering one ad -----------------------------------------------------------

    async def offer(
        self,
        msisdn: str,
        trigger: AdTrigger,
        params: Mapping[str, str | int] | None = None,
        *,
        template: str | None = None,
        campaign_id: str | None = None,
        idempotency_key: str | None = None,
        rate_checked: bool = False,
    ) -> AdVerdict:
        """Decide, record, submit. Returns once the decision is durable and (when
        sent) the notifier has taken the SMS."""
        request = AdRequest(msisdn, trigger, template, campaign_id, idempotency_key, rate_checked)
        chosen = self.ads.template_for(trigger, None, template)
        if not self.rules.enabled or trigger in self.rules.triggers_disabled:
            # Nothing to read: answered without the ledger.
            verdict = AdVerdict(False, Suppressed.DISABLED.value, chosen)
            self._emit(msisdn, trigger, verdict)
            return verdict
        now = self.clock()
        # A place among the ads waiting for the SMSC is reserved before the decision,
        # so the bound holds however many offers are deciding at once.
        self._inflight += 1
        try:
            inflight_full = self._inflight > self.rules.inflight_max
            ads, policy, bucket = self.ads, self.policy, self.bucket

            def take_token() -> bool:
                return not inflight_full and bucket.take()

            decision = await self.ledger.write(
                lambda tx: decide_and_record(tx, ads, policy, request, now,
                                               take_token=take_token,
                                               default_language=self.default_language))
            verdict = decision.verdict
            if verdict.replayed:
                return verdict
            if verdict.send:
                try:
                    await self.notifier.notify(Notice(
                        msisdn, verdict.template, dict(params or {}), "ad", decision.language))
                except Exception:
                    log.exception("ad_notify_failed", msisdn=msisdn, template=verdict.template)
        finally:
            self._inflight -= 1
        self._emit(msisdn, trigger, verdict)
        return verdict

    def _emit(self, msisdn: str, trigger: AdTrigger, verdict: AdVerdict) -> None:
        if verdict.send:
            self.events.emit("ad_sent", msisdn=msisdn, template=verdict.template, reason="",
                             detail=trigger.value)
        else:
            self.events.emit("ad_suppressed", msisdn=msisdn, template=verdict.template,
                             reason=verdict.reason, detail=trigger.value)

    # -- triggers from the lending service -------------------------------------------

    async def after_loan(self, msisdn: str, debt_before_minor: int, debt_after_minor: int) -> None:
        """Trigger 3: a loan brought the debt to `debt_limit_share_bp` of the ceiling."""
        if debt_after_minor <= debt_before_minor:
            return
        row = await self.ledger.read_point(lambda tx: tx.load_ad_subscriber(msisdn))
        segment = match_segment(row.profile if row else None, self.policy.segments)
        if segment is None or not self.ads.debt_limit_crossed(
            segment.ceiling_minor, debt_before_minor, debt_after_minor
        ):
            return
        await self.offer(msisdn, AdTrigger.DEBT_LIMIT, {"debt": debt_after_minor})

    def fire(self, coro: Any) -> None:
        """Run an offer in the background (the CCA or the USSD screen must not wait for
        an SMS). Bounded: past `background_tasks_max` the coroutine is dropped and
        counted as suppressed for rate."""
        if len(self._tasks) >= self.background_tasks_max:
            coro.close()
            self.events.emit("ad_suppressed", msisdn="", template="", reason=Suppressed.RATE.value,
                             detail="background_full")
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("ad_offer_failed", error=repr(task.exception()))

    def fire_offer(self, msisdn: str, trigger: AdTrigger,
                   params: Mapping[str, str | int] | None = None) -> None:
        self.fire(self.offer(msisdn, trigger, params))

    def fire_after_loan(self, msisdn: str, debt_before_minor: int, debt_after_minor: int) -> None:
        # Most loans cross no segment's threshold: those are settled here, without a
        # task or a read of the subscriber's segment.
        thresholds = [self.ads.debt_threshold(s.ceiling_minor) for s in self.policy.segments]
        if not thresholds or not (
            debt_before_minor < max(thresholds) and min(thresholds) <= debt_after_minor
        ):
            return
        self.fire(self.after_loan(msisdn, debt_before_minor, debt_after_minor))

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for background offers (graceful stop, tests)."""
        deadline = time.monotonic() + timeout_s
        while self._tasks and (left_s := deadline - time.monotonic()) > 0:
            await asyncio.wait(list(self._tasks), timeout=left_s)

    # -- housekeeping --------------------------------------------------------------

    async def prune(self, now: datetime | None = None) -> int:
        """Drop ads_sent rows the caps no longer read (older than 24 hours + a margin)."""
        before = (now or self.clock()) - CAP_WINDOW - timedelta(hours=1)
        return await self.ledger.write(
            lambda tx: tx.prune_ads(before, PRUNE_BATCH_MAX))
