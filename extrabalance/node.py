"""The node: the real adapters from config, the services from `bootstrap`, the inbound side.

Start order matters for money: the ledger opens first; the IN peers come up; the
resolver settles every operation left unsettled by a previous run (CREDITING,
UNKNOWN, RECOVERING) before the node takes new traffic; then the Diameter listener
for the IN's requests, the SMPP binds and the MQTT recharge subscription open.
Stop is the reverse: stop taking new dialogs and recharges, let in-flight sagas
finish (bounded), DPR to the Diameter peers, unbind SMPP, disconnect MQTT, close the
ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from extrabalance.adapters.gy_server import GyServer
from extrabalance.adapters.in_diameter import DiameterInPort, InNodeAddress
from extrabalance.adapters.smpp_channel import SmppChannel
from extrabalance.adapters.sms_notifier import SmsNotifier
from extrabalance.admin import AdminConfigError, AdminServer
from extrabalance.admin.server import reload_on_signal
from extrabalance.bootstrap import bootstrap
from extrabalance.clock import SYSTEM_CLOCK, Clock
from extrabalance.config import Settings, load_settings
from extrabalance.diameter.aio.node import (
    DiameterNode,
    NoPeerAvailable,
    PeerAddress,
    RequestTimeout,
)
from extrabalance.diameter.peer import LocalIdentity
from extrabalance.ledger.factory import NodeLedger, open_ledger
from extrabalance.observability import EdrWriter, EventRecorder, Metrics, configure_logging
from extrabalance.private_files import private_dir
from extrabalance.recharge.events import RechargeEvent as WireRecharge
from extrabalance.recharge.listener import MqttSettings, RechargeListener
from extrabalance.recharge.lowbalance import (
    LowBalanceEvent,
    LowBalanceListener,
    low_balance_settings,
)
from extrabalance.service.ads import AdTrigger, rules_from_settings
from extrabalance.service.ports import RechargeEvent
from extrabalance.service.resolver import resolve_interval_s
from extrabalance.service.templates import Templates
from extrabalance.smpp.aio.client import BindConfig, Esme

log = structlog.get_logger(__name__)

PEERS_READY_WAIT_S = 5.0  # how long start-up waits for IN peers before resolving anyway
DRAIN_WAIT_S = 10.0  # in-flight dialogs and sagas finished before a stop goes on
DIALOG_SWEEP_S = 1.0
EDR_FLUSH_S = 1.0
ADS_PRUNE_S = 300.0  # how often ads_sent rows older than the caps' window are dropped


@dataclass
class NodePorts:
    diameter: int = 0
    admin: int = 0


class Node:
    def __init__(self, settings: Settings, *, edr_dir: str | Path | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = s = settings
        self.clock = clock
        self.config_path: str | None = None  # the admin API's reload re-reads this file
        self.templates = Templates(s.templates, s.node.default_language, s.node.currency_exponent)
        self.metrics = Metrics()
        if s.storage.backend == "sqlite":
            private_dir(Path(s.storage.path).parent)
        self.edr = EdrWriter(edr_dir or s.storage.edr_directory(), s.node.name, clock=clock.time,
                             failure_counter=self.metrics.edr_write_failures)
        self.background_errors: dict[str, str] = {}  # task name → why it ended (/readyz)
        self.events = EventRecorder(self.metrics, self.edr)
        # SQLite (this node's file) or PostgreSQL (shared by the cluster's nodes),
        # migrated before anything else opens.
        self.ledger: NodeLedger = open_ledger(s.storage, node_name=s.node.name)
        tls_listener, tls_dialer = self._tls_contexts()
        self.diameter = DiameterNode(
            LocalIdentity(
                origin_host=s.node.origin_host,
                origin_realm=s.node.origin_realm,
                vendor_id=s.diameter.vendor_id,
                product_name=s.diameter.product_name,
                origin_state_id=int(clock.time()) & 0xFFFFFFFF,
            ),
            allowed_peers={n.origin_host for n in s.in_nodes},
            request_handler=self._on_diameter_request,
            ssl_context=tls_listener,
            client_ssl_context=tls_dialer,
            watchdog_s=s.diameter.watchdog_s,
            request_timeout_ms=s.diameter.request_timeout_ms,
            election=s.diameter.election,
            inbound_connections_max=s.diameter.inbound_connections_max,
            inbound_per_client_max=s.diameter.inbound_per_client_max,
        )
        exponent = s.node.currency_exponent
        self.in_port = DiameterInPort(
            self.diameter.request,
            {n.origin_host: InNodeAddress(n.origin_host, n.realm, n.origin_host) for n in s.in_nodes},
            origin_host=s.node.origin_host,
            origin_realm=s.node.origin_realm,
            service_context_id=s.diameter.service_context_id,
            currency_numeric=s.node.currency_numeric,
            currency_exponent=exponent,
            transient_errors=(RequestTimeout, NoPeerAvailable, asyncio.TimeoutError, ConnectionError),
            never_sent_errors=(NoPeerAvailable,),
            end_to_end_ids=self.diameter.new_end_to_end_id,
            clock=clock,
            observe=lambda action, seconds: self.metrics.child(
                self.metrics.in_latency, action).observe(seconds),
        )
        self.esme = Esme(
            [
                BindConfig(
                    host=b.host, port=b.port, system_id=b.system_id, password=b.password(),
                    system_type=b.system_type, window_max=b.window_max,
                    submit_rate_max_per_s=b.submit_rate_max_per_s, enquire_link_s=b.enquire_link_s,
                    response_timeout_s=b.response_timeout_s,
                    enquire_link_mode=b.enquire_link_mode, its_sequence=b.its_sequence,
                    password_source=b.password_source(),
                )
                for b in s.smpp.binds
            ],
            on_deliver=self._on_deliver,
            timeout_resends_max=s.smpp.submit_timeout_resends,
            use_message_payload=s.smpp.sms_long_mode == "message_payload",
        )
        # SMS leave through the ESME; the notifier exists before the services that
        # notify through it, the inbound channel (which needs them) after.
        self.sms = SmsNotifier(
            self.esme.send_sms, templates=self.templates, short_code=s.smpp.short_code,
            delivery_receipts=s.smpp.delivery_receipts,
            outbox_reference_tlv=s.smpp.outbox_reference_tlv)
        self.services = services = bootstrap(
            s, ledger=self.ledger, in_port=self.in_port, notifier=self.sms, events=self.events,
            clock=clock, templates=self.templates, on_purged=self.metrics.idempotency_purged.inc)
        self.policy = services.policy
        self.router = services.router
        self.outbox = services.outbox
        self.lending = services.lending
        self.payback = services.payback
        self.resolver = services.resolver
        self.accounts = services.accounts
        self.retention = services.retention
        self.dialogs = services.dialogs
        self.ads = services.ads
        self.campaigns = services.campaigns
        self.channel = SmppChannel(
            dialogs=self.dialogs, lending=self.lending, templates=self.templates,
            policy=self.policy, submit=self.esme.submit, sms=self.sms,
            ussd_code=s.smpp.ussd_code,
            ussd_service_type=s.smpp.ussd_service_type, dialog_id=s.smpp.dialog_id,
            abort_op=s.smpp.ussd_abort_op,
            observe_ussd=self.metrics.ussd_latency.observe,
            inbound_tasks_max=s.smpp.inbound_tasks_max,
            sms_repeat_window_s=s.smpp.sms_repeat_window_s,
            its_sequence=self._its_sequence,
        )
        self.gy = GyServer(
            self.lending, origin_host=s.node.origin_host, origin_realm=s.node.origin_realm,
            service_context_id=s.diameter.service_context_id,
            currency_numeric=s.node.currency_numeric, currency_exponent=exponent,
            answer_deadline_ms=s.diameter.advance_answer_deadline_ms,
            inflight_max=s.diameter.out_of_balance_inflight_max,
            per_subscriber_max=s.diameter.out_of_balance_per_subscriber_max,
            deadline_ms=s.diameter.out_of_balance_answer_deadline_ms,
            deliveries=services.undelivered,
        )
        # Whether each answer granting an advance reached a live connection.
        self.diameter.answer_observer = self.gy.answer_handed
        mqtt_settings = MqttSettings(
            host=s.mqtt.host, port=s.mqtt.port, client_id=s.mqtt.client_id,
            topics=tuple(s.mqtt.topics), dead_letter_topic=s.mqtt.dead_letter_topic,
            username=s.mqtt.username, password=s.mqtt.password(), tls=s.mqtt.tls,
            ca_file=s.mqtt.ca_file, inflight_max=s.mqtt.inflight_max,
            inbox_max=s.mqtt.inbox_max, shared_group=s.mqtt.shared_group,
        )
        self.recharges = RechargeListener(
            mqtt_settings,
            self._on_recharge,
            expected_currency=s.node.currency,
            in_nodes=frozenset(n.origin_host for n in s.in_nodes),
        )
        # advertisement SMS: the low-balance subscription (rules and campaigns are services)
        self.low_balance = LowBalanceListener(
            low_balance_settings(mqtt_settings, tuple(s.ads.low_balance_topics),
                                 s.ads.low_balance_dead_letter_topic),
            self._on_low_balance,
        )
        self.ports = NodePorts()
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopped = False
        self.started = asyncio.Event()

    def _tls_contexts(self) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
        """(listener, dialer) TLS contexts when certificates are configured.

        Both present the node's certificate; with `tls_ca_file` both verify the peer
        (mutual TLS). The dialer checks the IN's certificate against the CA and its
        name against the IN's Origin-Host (the name it is dialled by).
        """
        d = self.settings.diameter
        if not (d.tls_cert_file and d.tls_key_file):
            return None, None
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(d.tls_cert_file, d.tls_key_file)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=d.tls_ca_file)
        client.load_cert_chain(d.tls_cert_file, d.tls_key_file)
        if d.tls_ca_file:
            server.load_verify_locations(d.tls_ca_file)
            server.verify_mode = ssl.CERT_REQUIRED
        return server, client

    # -- inbound glue ----------------------------------------------------------------

    async def _on_diameter_request(self, msg: Any, peer_origin_host: str) -> Any:
        return await self.gy(msg, peer_origin_host)

    def _on_deliver(self, pdu: Any, system_id: str) -> int:
        return self.channel.on_deliver(pdu, system_id)

    def gateway_events(self) -> dict[str, int]:
        """What the SMPP gateways did that a clean peer does not, counted since start
        (exported as eb_smpp_gateway_events)."""
        binds = self.esme.bind_states()

        def total(key: str) -> int:
            return sum(int(b.get(key) or 0) for b in binds)  # type: ignore[call-overload]

        return {
            "ussd_repeats": self.dialogs.stats["repeats"],
            "sms_repeats": self.channel.stats["sms_repeats"],
            "submit_timeouts": total("timeouts"),
            "late_responses": total("late_responses"),
            "timeout_resends": self.esme.stats["timeout_resends"],
            "timeout_given_up": self.esme.stats["timeout_given_up"],
            "connect_failures": total("connect_failures"),
            "connections_lost": total("connections_lost"),
            "balance_checks_above_limit": self.lending.balance_checks["above_limit"],
        }

    def undelivered_advances(self) -> dict[str, int]:
        """Advances whose granting answer could not be handed to the IN's connection,
        counted since start (exported as eb_advance_answers_undelivered): marked,
        cleared by a delivered re-send, reversed after the hold, left for review."""
        return dict(self.services.undelivered.stats)

    def _its_sequence(self, bind: str) -> str:
        cfg = self.esme.bind_config(bind)
        return cfg.its_sequence if cfg is not None else "increment"

    async def _on_recharge(self, event: WireRecharge) -> None:
        """Returns only after the ledger commit: the listener acknowledges after it."""
        outcome = await self.payback.handle_recharge(
            RechargeEvent(
                event_id=event.event_id,
                msisdn=event.msisdn,
                amount_minor=event.amount_minor,
                in_node=event.in_node,
                balance_after_minor=event.balance_after_minor,
            )
        )
        # eb_recharges_total{outcome}: a redelivered recharge counts as `replayed`.
        self.metrics.recharges.labels(
            "replayed" if outcome.replayed else outcome.status.value.lower()).inc()

    async def _on_low_balance(self, event: LowBalanceEvent) -> None:
        """Returns once the ad decision is committed: the listener acknowledges after."""
        await self.ads.offer(event.msisdn, AdTrigger.LOW_BALANCE,
                             {"balance": event.balance_minor},
                             idempotency_key=f"lowbalance:{event.in_node}:{event.event_id}")

    # -- lifetime --------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        await self._start_admin()
        for node in s.in_nodes:
            self.diameter.add_peer_group(
                node.origin_host, node.realm,
                [PeerAddress(p.host, p.port, node.origin_host) for p in node.peers],
            )
        async def ready(origin_host: str) -> None:
            try:
                await self.diameter.wait_ready(origin_host, PEERS_READY_WAIT_S)
            except TimeoutError:
                log.warning("in_node_not_ready", in_node=origin_host)

        await asyncio.gather(*(ready(node.origin_host) for node in s.in_nodes))
        # Operations left pending by the last run are resolved in the background (the
        # resolver's first run starts now, concurrently and bounded); a subscriber with
        # one is refused OPERATION_PENDING until it settles, everyone else is served,
        # so the listeners open at once.
        self.ports.diameter = await self.diameter.listen(s.diameter.listen_host, s.diameter.listen_port)
        await self.esme.start()
        self.outbox.start()  # what the last run committed and did not send goes first
        self._tasks = [
            asyncio.create_task(self.recharges.run(), name="recharge-listener"),
            asyncio.create_task(self.resolver.run_forever(
                resolve_interval_s(s.storage.saga_lease_s)), name="resolver"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
            asyncio.create_task(self.retention.run_forever(), name="idempotency-retention"),
            asyncio.create_task(self.low_balance.run(), name="lowbalance-listener"),
            asyncio.create_task(self.campaigns.run_forever(), name="campaigns"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._background_ended)
        self.started.set()
        log.info("node_started", node=s.node.name, diameter_port=self.ports.diameter)

    async def wait_connected(self, timeout_s: float = 10.0) -> None:
        """Until every SMPP bind is bound and the MQTT session is up (demo and tests)."""
        await self.esme.wait_bound(timeout_s)
        deadline = time.monotonic() + timeout_s
        while not (self.recharges.stats().get("connected")
                   and self.low_balance.stats().get("connected")):
            if time.monotonic() > deadline:
                raise TimeoutError("MQTT subscription not up")
            await asyncio.sleep(0.02)

    def _background_ended(self, task: asyncio.Task[Any]) -> None:
        """A background task must never end silently: logged, counted, shown in /readyz."""
        if task.cancelled() or self._stopped:
            return
        exc = task.exception()
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "returned"
        self.background_errors[task.get_name()] = why
        self.metrics.background_failures.labels(task.get_name()).inc()
        log.error("background_task_ended", task=task.get_name(), error=why,
                  exc_info=exc)

    async def _housekeeping(self) -> None:
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(DIALOG_SWEEP_S)
            try:
                self.dialogs.expire()
            except Exception:  # one bad sweep must not end the EDR flushes below
                log.exception("dialog_sweep_failed")
            self.edr.flush()  # never raises: failures are held, logged, counted, retried
            if time.monotonic() - last_prune >= ADS_PRUNE_S:
                last_prune = time.monotonic()
                try:
                    await self.ads.prune()
                except Exception:
                    log.exception("ads_prune_failed")
                try:
                    await self.outbox.prune()
                except Exception:
                    log.exception("outbox_prune_failed")

    # -- configuration reload ------------------------------------------------------------

    RELOADABLE_SECTIONS = ("tiers", "fee_plans", "segments", "eligibility", "recovery",
                           "auto_advance", "ads", "templates")

    def reload(self, settings: Settings) -> dict[str, Any]:
        """Apply a new, already validated config without dropping binds or peers.

        Tiers, segments, fees, recovery, ads and templates change at once (the next
        decision uses them); sections that need new sockets or a new ledger (node,
        storage, diameter, in_nodes, smpp, mqtt, admin) are reported as needing a
        restart and keep their running values.
        """
        old = self.settings
        changed = [name for name in type(old).model_fields
                   if getattr(old, name) != getattr(settings, name)]
        restart = [name for name in changed if name not in self.RELOADABLE_SECTIONS]
        policy = settings.policy()
        templates = Templates(settings.templates, old.node.default_language,
                              old.node.currency_exponent)
        for service in (self.lending, self.payback, self.resolver, self.accounts):
            service.policy = policy
        self.dialogs.set_templates(templates)
        self.channel.set_policy(policy, templates)
        self.sms.set_templates(templates)
        self.ads.set_rules(rules_from_settings(settings), policy)  # issue 7
        self.campaigns.policy = policy
        self.policy, self.templates = policy, templates
        self.settings = settings.model_copy(update={name: getattr(old, name) for name in restart})
        log.info("config_reloaded", changed=changed, needs_restart=restart)
        return {"changed": changed, "needs_restart": restart}

    # -- admin API (extrabalance/admin) ----------------------------------------------

    async def _start_admin(self) -> None:
        """The admin API is not on the money path: if it cannot start, say so loudly
        and keep serving subscribers."""
        self.admin: AdminServer | None = None
        try:
            admin = AdminServer(self, config_path=self.config_path)
            self.ports.admin = await admin.start()
            self.admin = admin
        except (AdminConfigError, OSError) as exc:
            log.error("admin_api_not_started", reason=str(exc))

    async def _stop_admin(self) -> None:
        admin = getattr(self, "admin", None)
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()
            self.admin = None

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self._stop_admin()
        # The listener stops taking recharges, lets running paybacks finish and acks
        # them; the rest stay on the broker for the next start.
        with contextlib.suppress(Exception):
            await self.recharges.stop()
        with contextlib.suppress(Exception):
            await self.low_balance.stop()
        await self.channel.drain(DRAIN_WAIT_S)
        # Loans answered early on USSD finish their settlement, EDR and SMS; any cut
        # short stays CREDITING for the resolver of the next start.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.lending.drain_sagas(), DRAIN_WAIT_S)
        with contextlib.suppress(Exception):
            await self.ads.drain(DRAIN_WAIT_S)
        # Advance confirmations still running: let them finish (bounded); any left is
        # redone by the resolver at the next start.
        try:
            await asyncio.wait_for(self.lending.drain_confirmations(), DRAIN_WAIT_S)
        except TimeoutError:
            # Left CONFIRMING for the resolver of the next start: nothing is lost.
            self.lending.abandon_confirmations()
        self.resolver.abandon_follow_ups()  # their operations stay pending for the next run
        # Messages due now get a bounded chance to leave; the rest stay in the outbox
        # and are sent after the next start.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.outbox.drain(), DRAIN_WAIT_S)
        await self.outbox.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.esme.close()
        with contextlib.suppress(Exception):
            await self.diameter.close()
        self.edr.flush()
        await self.ledger.close()
        log.info("node_stopped", node=self.settings.node.name)


async def serve(node: Node, *, signals: Mapping[int, Callable[[], object]] | None = None) -> None:
    """Start `node`, run it until SIGTERM or SIGINT, then stop it gracefully. A signal
    during start-up stops at once rather than after the start finishes. `signals`: more
    handlers for this run (the config reload on SIGHUP, a benchmark's probe)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for number, handler in (signals or {}).items():
        loop.add_signal_handler(number, handler)
    starting = asyncio.ensure_future(node.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
    else:
        starting.result()
        await stopping
    await node.stop()


def run_node(config_path: str | None, clock: Clock = SYSTEM_CLOCK) -> int:
    """`extrabalance run --config FILE`: run until SIGTERM/SIGINT, then stop gracefully."""
    from extrabalance.preflight import check_runtime

    settings = load_settings(config_path)
    check_runtime(settings, config_path or "embedded default config")
    configure_logging(mask_msisdn_in_logs=settings.node.mask_msisdn_in_logs,
                      level=os.environ.get("EB_LOG_LEVEL", "INFO"), clock=clock)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass

    async def main() -> None:
        node = Node(settings, clock=clock)
        node.config_path = config_path  # the admin API's reload re-reads this file
        loop = asyncio.get_running_loop()
        # SIGHUP: re-read and validate the config file; a bad file is logged and ignored.
        reloads: set[asyncio.Task[None]] = set()

        def _hup() -> None:
            task = loop.create_task(reload_on_signal(node, config_path))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        await serve(node, signals={signal.SIGHUP: _hup})

    asyncio.run(main())
    return 0
