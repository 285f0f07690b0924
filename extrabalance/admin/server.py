"""The admin HTTP API of a running node: health, metrics, subscribers, peers, reload.

It runs in the node's own event loop (`http.HttpServer`), so it reads the node's live
objects (peer table, binds, metrics registry) without locks, and sends every change
through the same services the traffic uses (`AccountService` for bars and
adjustments), under the same per-subscriber lock.

Authentication (docs/operations.md, "Admin API"):
- a bearer token, from the environment variable `admin.token_env` or the file
  `admin.token_file`; compared in constant time;
- `/healthz` and the status page shell (`/`, `/status`, which hold no data) are open;
- with a token configured, everything else needs `Authorization: Bearer <token>`;
- with no token configured the server only starts on a loopback address and serves
  `/readyz` and `/metrics` without a token; every `/api/v1` route answers 403.

`ROUTES` is the one table of what the server serves; docs/openapi.json describes the
same set and a test keeps them equal.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from extrabalance.admin.http import (
    HttpError,
    HttpServer,
    Request,
    Response,
    error_response,
    json_response,
)
from extrabalance.admin.ports import AdminNode
from extrabalance.admin.stats import RateSampler, counter_by_label, money_figures
from extrabalance.config import (
    LOOPBACK_HOSTS,
    ConfigError,
    Settings,
    deep_merge,
    default_config_text,
)
from extrabalance.core.adjustments import ADJUSTMENT_KINDS, AdjustmentError
from extrabalance.ledger.ads_store import DND_PAGE_MAX
from extrabalance.ledger.factory import ledger_errors
from extrabalance.service.accounts import OptInRefused
from extrabalance.service.dnd import DoNotDisturb
from extrabalance.service.limits import limit_view
from extrabalance.service.protection import consent_rows

log = structlog.get_logger(__name__)

MSISDN_RE = re.compile(r"^[0-9]{1,15}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
TEXT_FIELD_MAX = 500  # characters kept for reason / who in the audit trail
READY_CHECK_TIMEOUT_S = 2.0
ADJUST_AMOUNT_MAX_MINOR = 10**12  # a sanity bound; real waivers are far smaller

PUBLIC, READ, ADMIN = "public", "read", "admin"


class AdminConfigError(Exception):
    """The admin API cannot start as configured (e.g. no token on a public address)."""


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    template: str  # OpenAPI-style path, `{msisdn}` for a parameter
    handler: str  # name of the AdminServer method
    access: str  # PUBLIC, READ or ADMIN

    def match(self, path: str) -> dict[str, str] | None:
        want, got = self.template.split("/"), path.split("/")
        if len(want) != len(got):
            return None
        params: dict[str, str] = {}
        for w, g in zip(want, got, strict=True):
            if w.startswith("{") and w.endswith("}"):
                if not g:
                    return None
                params[w[1:-1]] = g
            elif w != g:
                return None
        return params


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", "healthz", PUBLIC),
    Route("GET", "/readyz", "readyz", READ),
    Route("GET", "/metrics", "metrics", READ),
    Route("GET", "/", "status_page", PUBLIC),
    Route("GET", "/status", "status_page", PUBLIC),
    Route("GET", "/api/v1/subscribers/{msisdn}", "subscriber", ADMIN),
    Route("POST", "/api/v1/subscribers/{msisdn}/bar", "bar", ADMIN),
    Route("POST", "/api/v1/subscribers/{msisdn}/unbar", "unbar", ADMIN),
    Route("POST", "/api/v1/subscribers/{msisdn}/adjustments", "adjust", ADMIN),
    Route("POST", "/api/v1/subscribers/{msisdn}/auto-advance", "auto_advance", ADMIN),
    Route("GET", "/api/v1/subscribers/{msisdn}/consents", "consents", ADMIN),
    Route("GET", "/api/v1/dnd", "dnd_list", ADMIN),
    Route("POST", "/api/v1/dnd/{msisdn}", "dnd_add", ADMIN),
    Route("POST", "/api/v1/dnd/{msisdn}/remove", "dnd_remove", ADMIN),
    Route("GET", "/api/v1/peers", "peers", ADMIN),
    Route("GET", "/api/v1/binds", "binds", ADMIN),
    Route("GET", "/api/v1/stats", "stats", ADMIN),
    Route("POST", "/api/v1/config/reload", "reload", ADMIN),
)


def status_page_html() -> bytes:
    return resources.files("extrabalance.admin").joinpath("static/status.html").read_bytes()


def validate_config_file(config_path: str | Path | None,
                         overrides: dict[str, Any] | None = None) -> Settings:
    """Read and validate a config like `load_settings`, but keep the errors structured.

    Raises `ConfigProblem` with the file and one (key, reason) per problem.
    """
    source = str(config_path) if config_path is not None else "embedded default config"
    try:
        text = (Path(config_path).read_text(encoding="utf-8") if config_path is not None
                else default_config_text())
    except OSError as exc:
        raise ConfigProblem(source, [("(file)", f"cannot read: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigProblem(source, [("(syntax)", f"not valid TOML: {exc}")]) from None
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in err["loc"]) or "(top level)",
                     err["msg"].removeprefix("Value error, ")) for err in exc.errors()]
        raise ConfigProblem(source, problems) from None


class ConfigProblem(ConfigError):
    def __init__(self, file: str, problems: list[tuple[str, str]]) -> None:
        self.file = file
        self.problems = problems
        super().__init__(f"{file}: invalid configuration: "
                         + "; ".join(f"{k}: {r}" for k, r in problems))


AUTH_FAIL_LOG_INTERVAL_S = 60.0  # one line per client address per interval at most
AUTH_FAIL_CLIENTS_TRACKED_MAX = 1000


class AuthFailureLog:
    """Logs wrong tokens without letting a guesser fill the disk or the log carry data:
    one line per client address per `AUTH_FAIL_LOG_INTERVAL_S`, which counts the
    failures it stands for, and the route template instead of the path (a path holds
    an MSISDN)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # client → (last logged, unlogged)

    def failed(self, peer: str, route: str) -> None:
        client = peer.rpartition(":")[0] or peer
        now = self._clock()
        last, unlogged = self._seen.get(client, (float("-inf"), 0))
        unlogged += 1
        if now - last < AUTH_FAIL_LOG_INTERVAL_S:
            self._seen[client] = (last, unlogged)
            return
        if client not in self._seen and len(self._seen) >= AUTH_FAIL_CLIENTS_TRACKED_MAX:
            self._seen.clear()
        self._seen[client] = (now, 0)
        log.warning("admin_auth_failed", client=client, route=route, failures=unlogged)


class AdminServer:
    """Construct with the node (anything that is an `AdminNode`); `await start()`
    returns the bound port."""

    def __init__(self, node: AdminNode, *, config_path: str | Path | None = None,
                 config_overrides: dict[str, Any] | None = None,
                 token: str | None = None, host: str | None = None,
                 port: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.config_path = config_path
        self.config_overrides = config_overrides
        admin = node.settings.admin
        self.host = host if host is not None else admin.listen_host
        self.port = port if port is not None else admin.listen_port
        if token is None:
            try:
                token = admin.token()
            except ValueError as exc:
                raise AdminConfigError(str(exc)) from None
        self.token = token or None
        if self.token is None and self.host not in LOOPBACK_HOSTS:
            raise AdminConfigError(
                f"admin.listen_host {self.host!r} is not a loopback address and no admin "
                f"token is configured (admin.token_env / admin.token_file): refusing to start")
        self.http = HttpServer(self.handle)
        self.auth_failures = AuthFailureLog(clock)
        self.sampler = RateSampler(node.metrics.registry)
        self._reload_lock = asyncio.Lock()
        self._peer_labels: set[str] = set()  # gauge series set by the last refresh
        self._bind_labels: set[str] = set()

    @property
    def read_only(self) -> bool:
        return self.token is None

    async def start(self) -> int:
        self.port = await self.http.start(self.host, self.port)
        self.sampler.start()
        log.info("admin_api_started", host=self.host, port=self.port,
                 mode="read-only (no token)" if self.read_only else "token")
        return self.port

    async def close(self) -> None:
        await self.sampler.stop()
        await self.http.close()

    # -- dispatch ------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        allowed: list[str] = []
        for route in ROUTES:
            params = route.match(request.path)
            if params is None:
                continue
            if route.method != request.method:
                allowed.append(route.method)
                continue
            self._authorise(route, request)
            handler: Callable[..., Awaitable[Response]] = getattr(self, "h_" + route.handler)
            if "msisdn" in params and not MSISDN_RE.match(params["msisdn"]):
                raise HttpError(400, "msisdn must be 1 to 15 digits")
            return await handler(request, **params)
        if allowed:
            return error_response(405, f"method {request.method} not allowed here",
                                  {"Allow": ", ".join(sorted(set(allowed)))})
        return error_response(404, f"no such resource {request.path}")

    def _authorise(self, route: Route, request: Request) -> None:
        if route.access == PUBLIC:
            return
        if self.token is None:
            if route.access == READ:
                return
            raise HttpError(403, "the admin API is read-only: no admin token is configured "
                                 "(admin.token_env or admin.token_file)")
        given = request.header("authorization") or ""
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() != "bearer" or not credentials:
            raise HttpError(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.strip().encode(), self.token.encode()):
            self.auth_failures.failed(request.peer, route.template)
            raise HttpError(401, "wrong bearer token",
                            {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    # -- health and metrics ----------------------------------------------------------

    async def h_healthz(self, request: Request) -> Response:
        return json_response(200, {"status": "alive", "node": self.node.settings.node.name})

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        node = self.node
        checks: dict[str, Any] = {}
        try:
            await asyncio.wait_for(node.ledger.read(lambda tx: tx.ping()),
                                   READY_CHECK_TIMEOUT_S)
            checks["ledger"] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - reported, not raised (timeouts too)
            checks["ledger"] = {"ok": False, "error": str(exc) or type(exc).__name__}
        peers = node.diameter.peer_states()
        in_nodes = {}
        for n in node.settings.in_nodes:
            open_peers = [p["address"] for p in peers
                          if p.get("group") == n.origin_host and p.get("state") == "Open"]
            in_nodes[n.name] = {"ok": bool(open_peers), "open_peers": open_peers,
                                "origin_host": n.origin_host}
        checks["diameter"] = {"ok": all(v["ok"] for v in in_nodes.values()),
                              "in_nodes": in_nodes}
        binds = node.esme.bind_states()
        bound = [b["name"] for b in binds if b.get("bound")]
        checks["smpp"] = {"ok": bool(bound), "bound": bound, "configured": len(binds)}
        mqtt = node.recharges.stats()
        checks["mqtt"] = {"ok": bool(mqtt.get("connected"))}
        checks["edr"] = node.edr.health()
        checks["background"] = {"ok": not node.background_errors,
                                "ended": dict(node.background_errors)}
        return all(c["ok"] for c in checks.values()), checks

    async def h_readyz(self, request: Request) -> Response:
        ready, checks = await self.readiness()
        return json_response(200 if ready else 503,
                             {"ready": ready, "checks": checks})

    async def refresh_gauges(self) -> dict[str, int]:
        node = self.node
        totals = await node.ledger.account_totals()
        node.metrics.outstanding_minor.set(
            totals.get("principal_receivable", 0) + totals.get("fee_receivable", 0))
        peers = {f"{p.get('origin_host') or '?'} {p.get('direction')} {p.get('address')}":
                 1 if p.get("state") == "Open" else 0 for p in node.diameter.peer_states()}
        binds = {str(b.get("name")): 1 if b.get("bound") else 0 for b in node.esme.bind_states()}
        for gauge, values, seen in ((node.metrics.peer_up, peers, self._peer_labels),
                                    (node.metrics.bind_up, binds, self._bind_labels)):
            for label in seen - set(values):  # a connection that is gone: drop its series
                gauge.remove(label)
            for label, up in values.items():
                gauge.labels(label).set(up)
            seen.clear()
            seen.update(values)
        for kind, count in node.gateway_events().items():
            node.metrics.smpp_events.labels(kind).set(count)
        for kind, count in node.undelivered_advances().items():
            node.metrics.undelivered_advances.labels(kind).set(count)
        for (peer, kind), count in node.diameter.peer_warnings().items():
            node.metrics.peer_warnings.labels(peer, kind).set(count)
        return totals

    async def h_metrics(self, request: Request) -> Response:
        await self.refresh_gauges()
        return Response(200, generate_latest(self.node.metrics.registry), CONTENT_TYPE_LATEST)

    async def h_status_page(self, request: Request) -> Response:
        return Response(200, status_page_html(), "text/html; charset=utf-8", {
            # The page loads nothing from elsewhere and talks only to this server.
            # It is never framed (no clickjacking of an operator's session).
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                       "style-src 'unsafe-inline'; connect-src 'self'; "
                                       "frame-ancestors 'none'",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
        })

    # -- subscribers ---------------------------------------------------------------

    async def h_subscriber(self, request: Request, msisdn: str) -> Response:
        view = await self.node.ledger.subscriber_view(msisdn)
        if not view["known"] and not view["loans"] and not view["journal"]:
            return error_response(404, f"no subscriber {msisdn} in the ledger")
        lending = self.node.lending
        view["limit"] = await self.node.ledger.read_point(  # limits from behaviour (issue 20)
            lambda tx: limit_view(tx, msisdn, lending.policy, lending.clock())
        )
        view["route"]["static_in_node"] = self.node.router.static_route(msisdn)
        view["route"]["in_node"] = view["route"]["learned_in_node"] or view["route"][
            "static_in_node"]
        return json_response(200, view)

    async def h_consents(self, request: Request, msisdn: str) -> Response:
        """His consent trail (docs/lending.md "Consumer protection"), oldest first."""
        rows = await self.node.ledger.read(lambda tx: consent_rows(tx, msisdn))
        return json_response(200, {"msisdn": msisdn, "consents": rows})

    @staticmethod
    def _text(body: dict[str, Any], name: str, *, required: bool) -> str:
        value = body.get(name, "")
        if not isinstance(value, str):
            raise HttpError(400, f"{name} must be a string")
        value = value.strip()
        if required and not value:
            raise HttpError(400, f"{name} is required")
        if len(value) > TEXT_FIELD_MAX:
            raise HttpError(400, f"{name} is longer than {TEXT_FIELD_MAX} characters")
        return value

    def _object(self, request: Request) -> dict[str, Any]:
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        return body

    async def h_bar(self, request: Request, msisdn: str) -> Response:
        body = self._object(request)
        reason = self._text(body, "reason", required=True)
        who = self._text(body, "who", required=True)
        notify = body.get("notify", True)
        if not isinstance(notify, bool):
            raise HttpError(400, "notify must be true or false")
        await self.node.accounts.bar(msisdn, reason, who, notify=notify)
        log.info("admin_bar", msisdn=msisdn, who=who)
        return json_response(200, {"msisdn": msisdn, "barred": True, "reason": reason,
                                   "who": who})

    # -- the do-not-disturb list (service/dnd.py) -----------------------------------

    def _dnd(self) -> DoNotDisturb:
        return DoNotDisturb(self.node.ledger, self.node.lending.clock)

    async def h_dnd_list(self, request: Request) -> Response:
        after = (request.head.query.get("after") or [""])[0]
        if after and not MSISDN_RE.match(after):
            raise HttpError(400, "after must be an MSISDN (1 to 15 digits)")
        limit_text = (request.head.query.get("limit") or ["100"])[0]
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= DND_PAGE_MAX:
            raise HttpError(400, f"limit must be 1 to {DND_PAGE_MAX}")
        rows = await self._dnd().page(after, int(limit_text))
        return json_response(200, {"entries": [
            {"msisdn": m, "source": src, "added_by": by, "added_at": at}
            for m, src, by, at in rows]})

    async def h_dnd_add(self, request: Request, msisdn: str) -> Response:
        return await self._dnd_change(request, msisdn, listed=True)

    async def h_dnd_remove(self, request: Request, msisdn: str) -> Response:
        return await self._dnd_change(request, msisdn, listed=False)

    async def _dnd_change(self, request: Request, msisdn: str, *, listed: bool) -> Response:
        body = self._object(request)
        reason = self._text(body, "reason", required=True)
        who = self._text(body, "who", required=True)
        dnd = self._dnd()
        changed = await (dnd.add if listed else dnd.remove)(msisdn, who, reason)
        log.info("admin_dnd_add" if listed else "admin_dnd_remove", msisdn=msisdn, who=who)
        return json_response(200, {"msisdn": msisdn, "listed": listed,
                                   "added" if listed else "removed": changed})

    async def h_unbar(self, request: Request, msisdn: str) -> Response:
        body = self._object(request)
        reason = self._text(body, "reason", required=True)
        who = self._text(body, "who", required=True)
        await self.node.accounts.unbar(msisdn, who, reason)
        log.info("admin_unbar", msisdn=msisdn, who=who)
        return json_response(200, {"msisdn": msisdn, "barred": False, "reason": reason,
                                   "who": who})

    async def h_auto_advance(self, request: Request, msisdn: str) -> Response:
        body = self._object(request)
        unknown = sorted(set(body) - {"enabled", "reason", "who"})
        if unknown:
            raise HttpError(400, f"unknown fields: {', '.join(unknown)}")
        enabled = body.get("enabled")
        if not isinstance(enabled, bool):
            raise HttpError(400, "enabled must be true or false")
        reason = self._text(body, "reason", required=True)
        who = self._text(body, "who", required=True)
        try:
            changed = await self.node.accounts.set_auto_advance(msisdn, enabled, who, reason)
        except OptInRefused as exc:
            raise HttpError(409, str(exc)) from None
        log.info("admin_auto_advance", msisdn=msisdn, enabled=enabled, changed=changed, who=who)
        return json_response(200, {"msisdn": msisdn, "auto_advance": enabled,
                                   "changed": changed, "reason": reason, "who": who})

    async def h_adjust(self, request: Request, msisdn: str) -> Response:
        body = self._object(request)
        unknown = sorted(set(body) - {"kind", "amount_minor", "reason", "who", "loan_id",
                                      "request_id"})
        if unknown:
            raise HttpError(400, f"unknown fields: {', '.join(unknown)}")
        kind = body.get("kind", "waive")
        if kind not in ADJUSTMENT_KINDS:
            raise HttpError(400, f"kind must be one of {', '.join(ADJUSTMENT_KINDS)}")
        amount = body.get("amount_minor")
        if not isinstance(amount, int) or isinstance(amount, bool) or not (
                0 < amount <= ADJUST_AMOUNT_MAX_MINOR):
            raise HttpError(400, "amount_minor must be a positive integer (minor units)")
        reason = self._text(body, "reason", required=True)
        who = self._text(body, "who", required=True)
        loan_id = body.get("loan_id")
        if loan_id is not None and (not isinstance(loan_id, str) or not loan_id):
            raise HttpError(400, "loan_id must be a string")
        request_id = body.get("request_id")
        if request_id is not None and (not isinstance(request_id, str)
                                       or not REQUEST_ID_RE.match(request_id)):
            raise HttpError(400, "request_id must be 1-100 characters of [A-Za-z0-9_.:-]")
        result = await write_down(self.node, msisdn, kind=kind, amount_minor=amount,
                                  who=who, reason=reason, loan_id=loan_id,
                                  request_id=request_id)
        return json_response(200, result)

    # -- network elements, stats ---------------------------------------------------

    async def h_peers(self, request: Request) -> Response:
        return json_response(200, {"peers": self.node.diameter.peer_states()})

    async def h_binds(self, request: Request) -> Response:
        return json_response(200, {"binds": self.node.esme.bind_states()})

    async def stats(self) -> dict[str, Any]:
        totals = await self.refresh_gauges()
        registry = self.node.metrics.registry
        return {
            "node": self.node.settings.node.name,
            "currency": self.node.settings.node.currency,
            "currency_exponent": self.node.settings.node.currency_exponent,
            "window_s": self.sampler.window_s(),
            "rates_per_s": self.sampler.rates_per_s(),
            **money_figures(totals),
            "refusals_by_reason": counter_by_label(registry, "eb_refusals_total", "reason"),
            "ads_by_outcome": counter_by_label(registry, "eb_ads_total", "outcome"),
            "peers_open": sum(1 for p in self.node.diameter.peer_states()
                              if p.get("state") == "Open"),
            "binds_bound": sum(1 for b in self.node.esme.bind_states() if b.get("bound")),
            "mqtt_connected": bool(self.node.recharges.stats().get("connected")),
        }

    async def h_stats(self, request: Request) -> Response:
        return json_response(200, await self.stats())

    # -- reload --------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file; raises `ConfigProblem` and keeps the running one."""
        async with self._reload_lock:
            return await reload_config(self.node, self.config_path, self.config_overrides)

    async def h_reload(self, request: Request) -> Response:
        try:
            result = await self.reload()
        except ConfigProblem as exc:
            log.warning("config_reload_refused", file=exc.file, problems=exc.problems)
            return json_response(400, {
                "error": "invalid configuration; the running configuration is unchanged",
                "file": exc.file,
                "problems": [{"key": k, "reason": r} for k, r in exc.problems],
            })
        return json_response(200, result)


async def reload_config(node: AdminNode, config_path: str | Path | None,
                        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate the config file again and hand it to `node.reload` (API and SIGHUP).

    Raises `ConfigProblem` (file, key, reason) and leaves the running config alone.
    """
    settings = await asyncio.to_thread(validate_config_file, config_path, overrides)
    return node.reload(settings)


async def reload_on_signal(node: AdminNode, config_path: str | Path | None) -> None:
    """SIGHUP: like the reload endpoint, with the outcome in the log only."""
    try:
        result = await reload_config(node, config_path)
    except ConfigProblem as exc:
        log.error("config_reload_refused", file=exc.file, problems=exc.problems)
        return
    except Exception:  # a signal handler must never take the node down
        log.exception("config_reload_failed")
        return
    log.info("config_reload_by_signal", **result)


async def write_down(node: AdminNode, msisdn: str, *, kind: str, amount_minor: int, who: str,
                     reason: str, loan_id: str | None = None,
                     request_id: str | None = None) -> dict[str, Any]:
    """Goodwill write-down of a subscriber's debt through the account service (his
    lock, one balanced journal entry, audit, EDR); 409 when the ledger refuses it
    (unsettled operation, amount too large), 500 on a database error."""
    try:
        result = await node.accounts.write_down(
            msisdn, kind=kind, amount_minor=amount_minor, who=who, reason=reason,
            loan_id=loan_id, request_id=request_id)
    except AdjustmentError as exc:
        raise HttpError(409, str(exc)) from None
    except ledger_errors() as exc:
        raise HttpError(500, f"ledger error: {exc}") from None
    return result.as_dict()
