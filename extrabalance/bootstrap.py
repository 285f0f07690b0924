"""The node's object graph, built once: the services over the adapters they are given.

`bootstrap` takes the adapters (the ledger `ledger.factory.open_ledger` opened, the IN
port, the outbound SMS notifier, the event sink) and builds every service from the
settings, each given what it works with through its constructor: nothing is set on a
service after it is made. The order follows what each needs:

    outbox (notifier) → resolver → advertiser → lending (outbox, resolver's
    follow-ups, route prober, advertiser) → payback → accounts → retention →
    USSD dialogs (lending) → campaigns (advertiser)

One `SubscriberLocks` is made here and passed to every service that moves a
subscriber's money or state (lending, payback, resolver, accounts): their
constructors require it, so per-subscriber serialisation cannot split by omission.

The node (`node.py`) calls this with its real adapters and builds the inbound side
around the result (the SMPP channel, the Gy server, the MQTT listeners); tests call it
with fakes and the in-memory ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from extrabalance.clock import Clock
from extrabalance.config import Settings
from extrabalance.core.policy import Policy
from extrabalance.service.accounts import AccountService
from extrabalance.service.ads import Advertiser, rules_from_settings
from extrabalance.service.campaign import CampaignService
from extrabalance.service.lending import LendingService
from extrabalance.service.locks import SubscriberLocks
from extrabalance.service.outbox import OUTBOX_CLAIM_S, OutboxSender
from extrabalance.service.ports import EventSink, InPort, Notifier
from extrabalance.service.recovery import PaybackService
from extrabalance.service.resolver import Resolver
from extrabalance.service.retention import IdempotencyRetention
from extrabalance.service.routing import RouteProber, Router, RouteRule
from extrabalance.service.templates import Templates
from extrabalance.service.undelivered import UndeliveredAdvances
from extrabalance.service.unit_of_work import UnitOfWork
from extrabalance.service.ussd import UssdDialogs


@dataclass(frozen=True, slots=True)
class Services:
    """What `bootstrap` built; each service already holds everything it uses."""

    policy: Policy
    templates: Templates
    router: Router
    locks: SubscriberLocks
    outbox: OutboxSender
    resolver: Resolver
    undelivered: UndeliveredAdvances
    ads: Advertiser
    lending: LendingService
    payback: PaybackService
    accounts: AccountService
    retention: IdempotencyRetention
    dialogs: UssdDialogs
    campaigns: CampaignService


def router_from_settings(settings: Settings) -> Router:
    """The static routes: each IN node's MSISDN ranges and prefixes."""
    return Router([RouteRule(node.origin_host, prefix=r.prefix, start=r.start, end=r.end)
                   for node in settings.in_nodes for r in node.ranges])


def bootstrap(
    settings: Settings,
    *,
    ledger: UnitOfWork,
    in_port: InPort,
    notifier: Notifier,
    events: EventSink,
    clock: Clock,
    templates: Templates,
    on_purged: Callable[[int], None] | None = None,
) -> Services:
    """Build the node's services over these adapters (see the module docstring).

    `notifier` sends SMS (the outbox's target, the advertiser's and the account
    service's) rendered from `templates` (the USSD dialogs' too); `on_purged` is told how many idempotency keys each purge removed.
    """
    s = settings
    utc_now = clock.now
    language = s.node.default_language
    policy = s.policy()
    router = router_from_settings(s)
    locks = SubscriberLocks()
    confirming_ins = frozenset(n.origin_host for n in s.in_nodes if n.advance_confirmation)
    # Messages that report money go through the outbox: written with the money,
    # sent in the background (never awaited before a CCA, a screen or a PUBACK).
    # On PostgreSQL other nodes may share the outbox: rows are taken, not read.
    outbox = OutboxSender(
        ledger, notifier, utc_now, monotonic=clock.monotonic,
        claim_s=OUTBOX_CLAIM_S if s.storage.backend == "postgresql" else None)
    # Advances whose granting CCA could not be handed to the IN's connection: marked,
    # spared by recharges, reversed by the resolver after the IN's hold.
    undelivered = UndeliveredAdvances(
        ledger, events, utc_now, locks=locks, advance_confirmation_nodes=confirming_ins,
        holds_s={n.origin_host: n.undelivered_advance_hold_s for n in s.in_nodes})
    resolver = Resolver(ledger, in_port, outbox, events, policy, utc_now, locks=locks,
                        default_language=language, advance_confirmation_nodes=confirming_ins,
                        node_name=s.node.name, lease_s=s.storage.saga_lease_s,
                        undelivered=undelivered)
    ads = Advertiser(ledger, notifier, events, policy, rules_from_settings(s), utc_now,
                     default_language=language)
    # Pending IN operations are re-sent on the Tx-timer schedule (the resolver's
    # follow-ups), not only at its next pass.
    lending = LendingService(
        ledger, in_port, outbox, events, policy, router, utc_now, locks=locks,
        default_language=language, ads=ads,
        prober=RouteProber(in_port, [n.origin_host for n in s.in_nodes]),
        follow_up=resolver.follow_up, advance_confirmation_nodes=confirming_ins)
    payback = PaybackService(ledger, in_port, outbox, events, policy, router, utc_now,
                             locks=locks, default_language=language,
                             follow_up=resolver.follow_up)
    accounts = AccountService(ledger, notifier, events, policy, utc_now, locks=locks)
    retention = IdempotencyRetention(
        ledger, timedelta(hours=s.storage.idempotency_retention_hours), utc_now,
        on_purged=on_purged)
    dialogs = UssdDialogs(
        lending, templates, ussd_code=s.smpp.ussd_code, timeout_s=s.smpp.dialog_timeout_s,
        dialogs_max=s.smpp.dialogs_max, node_name=s.node.name,
        repeat_window_s=s.smpp.ussd_repeat_window_s)
    campaigns = CampaignService(
        ledger, ads, policy, utc_now,
        send_rate_max_per_s=s.ads.campaign.send_rate_max_per_s,
        batch_max=s.ads.campaign.batch_max, poll_s=s.ads.campaign.poll_s)
    return Services(policy=policy, templates=templates, router=router, locks=locks,
                    outbox=outbox, resolver=resolver, undelivered=undelivered, ads=ads, lending=lending,
                    payback=payback, accounts=accounts, retention=retention,
                    dialogs=dialogs, campaigns=campaigns)
