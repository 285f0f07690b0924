"""Configuration: one TOML file, validated with pydantic, turned into plain data.

A bad config fails at start with the file, the key and what is wrong
(`ConfigError`). Secrets are never read from the file itself: a `*_env` key names an
environment variable and a `*_file` key names a file that holds the secret.
"""

from __future__ import annotations

import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from extrabalance.core.limits import LimitPolicy
from extrabalance.core.policy import (
    Bundle,
    Condition,
    Currency,
    EligibilityPolicy,
    FeePlan,
    PaybackOrder,
    Policy,
    RecoveryPolicy,
    RuleOp,
    Segment,
    Tier,
)
from extrabalance.core.protection import PRESETS, ProtectionPolicy, resolve
from extrabalance.core.sagas import SAGA_LEASE_S
from extrabalance.diameter.peer import DUPLICATE_CACHE_TTL_S
from extrabalance.service.undelivered import UNDELIVERED_ADVANCE_HOLD_S

MSISDN_RE = re.compile(r"^[0-9]{1,15}$")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
TIERS_MIN = 12
SMPP_PASSWORD_MAX = 8  # SMPP 3.4 §4.1.1: password is a C-Octet String of at most 9 octets
DEFAULT_CONFIG_NAME = "extrabalance.toml"
# Idempotency keys must outlive every window in which a request can be replayed; the
# longest is the MQTT persistent session (7 days, `MqttSettings.session_expiry_s`):
# recharges committed but not yet acknowledged are redelivered when the node comes
# back, however long it was away within that time. A day on top of it is the margin.
# See docs/ledger.md "Idempotency retention".
IDEMPOTENCY_RETENTION_HOURS_MIN = 8 * 24
IDEMPOTENCY_RETENTION_HOURS_MAX = 10 * 366 * 24
IDEMPOTENCY_RETENTION_HOURS_DEFAULT = 10 * 24


class ConfigError(Exception):
    """A configuration that cannot run; the message names file, key and reason."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _secret(env: str | None, file: str | None, what: str) -> str | None:
    if env:
        value = os.environ.get(env)
        if value is None:
            return None
        return value
    if file:
        try:
            return Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"{what}: cannot read secret file {file!r}: {exc.strerror}") from exc
    return None


def _url_password(url: str) -> str | None:
    """The password in a postgresql://user:password@host/... URL, if any."""
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    if "@" not in netloc:
        return None
    userinfo = netloc.rsplit("@", 1)[0]
    return userinfo.split(":", 1)[1] if ":" in userinfo else None


def _url_shown(url: str) -> str:
    """A URL fit for an error message: its password, if any, replaced."""
    password = _url_password(url)
    return url.replace(f":{password}@", ":***@", 1) if password else url


class NodeSection(_Model):
    name: str = "eb-node-1"
    origin_host: str
    origin_realm: str
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "EGP"
    currency_numeric: Annotated[int, Field(ge=1, le=999)] = 818
    currency_exponent: Annotated[int, Field(ge=0, le=4)] = 2
    timezone: str = "UTC"
    default_language: str = "en"
    mask_msisdn_in_logs: bool = True


POSTGRESQL_URL_SCHEMES = ("postgresql://", "postgres://")
POSTGRESQL_POOL_MAX = 8  # connections per node (the adapter's default)
POSTGRESQL_EDR_DIR_DEFAULT = "var/edr"


class StorageSection(_Model):
    # "sqlite": the embedded ledger (`path`). "postgresql": a PostgreSQL server (`url`,
    # its password from `password_env` / `password_file`) that several nodes may share
    # (docs/scale-out.md).
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    path: str = "var/extrabalance.db"
    # Where this node writes its EDR files: `edr` beside `path` by default (SQLite), and
    # `var/edr` on PostgreSQL, which has no ledger file. Each node writes its own day
    # files (edr-YYYYMMDD.csv), so nodes sharing a ledger must not share this directory.
    edr_dir: str | None = None
    url: str | None = None  # postgresql://USER@HOST:PORT/DATABASE, without the password
    dsn: str | None = None  # the same, under the name older configs used
    password_env: str | None = None
    password_file: str | None = None
    pool_max: Annotated[int, Field(ge=1, le=100)] = POSTGRESQL_POOL_MAX
    group_commit_max_ops: Annotated[int, Field(ge=1, le=10_000)] = 256
    group_commit_wait_ms: Annotated[float, Field(ge=0, le=1000)] = 2.0
    # How long the first outcome of each inbound request is kept to answer replays.
    idempotency_retention_hours: int = IDEMPOTENCY_RETENTION_HOURS_DEFAULT
    # Several nodes on one ledger: an unsettled loan or recovery stays leased to its node
    # this long after the node's resolver last renewed it (it renews every quarter of it,
    # 30 s at most); another node's resolver takes over a saga only once its lease ran out
    # (docs/scale-out.md). Shorter: a dead node's operations are finished sooner; never
    # shorter than a node's longest pause (a GC, a blocked disk) or a live node loses them.
    saga_lease_s: Annotated[float, Field(ge=4, le=3600)] = SAGA_LEASE_S

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_named(cls, backend: object) -> object:
        if backend == "postgres":
            raise ValueError('"postgres" is spelled "postgresql" (backend = "postgresql", '
                             'with url = "postgresql://USER@HOST:PORT/DATABASE")')
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f'{backend!r} is not a ledger backend: "sqlite" or "postgresql"')
        return backend

    @model_validator(mode="after")
    def _server_settings(self) -> StorageSection:
        if self.url and self.dsn:
            raise ValueError("storage.url and storage.dsn name the same thing: keep one")
        url = self.url or self.dsn
        if self.backend == "sqlite":
            if url or self.password_env or self.password_file:
                raise ValueError('storage.url, dsn and password_* are for backend = '
                                 '"postgresql"; the SQLite ledger is storage.path')
            return self
        if not url:
            raise ValueError('storage.backend = "postgresql" needs storage.url '
                             '("postgresql://USER@HOST:PORT/DATABASE")')
        if not url.startswith(POSTGRESQL_URL_SCHEMES):
            raise ValueError(f"storage.url {_url_shown(url)!r} is not a PostgreSQL URL "
                             "(postgresql://USER@HOST:PORT/DATABASE)")
        if _url_password(url):
            raise ValueError("storage.url carries a password: put it in the environment "
                             "(storage.password_env) or a file (storage.password_file)")
        if self.password_env and self.password_file:
            raise ValueError("storage.password_env and password_file: give one")
        return self

    def edr_directory(self) -> Path:
        """Where this node's EDR files go (see `edr_dir`)."""
        if self.edr_dir:
            return Path(self.edr_dir)
        if self.backend == "postgresql":
            return Path(POSTGRESQL_EDR_DIR_DEFAULT)
        return Path(self.path).parent / "edr"

    def postgresql_url_shown(self) -> str:
        """The server's URL for messages (any password in it hidden)."""
        return _url_shown(self.postgresql_url())

    def postgresql_url(self) -> str:
        """The server's URL as configured (no password)."""
        url = self.url or self.dsn
        if self.backend != "postgresql" or not url:
            raise ConfigError('storage.backend is not "postgresql"')
        return url

    def postgresql_conninfo(self) -> str:
        """The connection string for the driver, with the password from its env
        variable or file (the URL alone when neither is set: trust or .pgpass)."""
        url = self.postgresql_url()
        if self.password_env and self.password_env not in os.environ:
            raise ConfigError(f"storage: environment variable {self.password_env} "
                              "(password_env) is not set")
        try:
            password = _secret(self.password_env, self.password_file, "storage")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if password is None:
            return url
        try:
            from psycopg.conninfo import make_conninfo
        except ImportError as exc:  # the optional extra
            raise ConfigError('storage.backend = "postgresql" needs the PostgreSQL driver: '
                              "pip install 'extrabalance[postgresql]'") from exc
        return make_conninfo(url, password=password)

    @field_validator("idempotency_retention_hours")
    @classmethod
    def _retention_outlasts_replays(cls, hours: int) -> int:
        if hours < IDEMPOTENCY_RETENTION_HOURS_MIN:
            raise ValueError(
                f"{hours} hours is shorter than the {IDEMPOTENCY_RETENTION_HOURS_MIN} hours "
                "minimum: a recharge the MQTT broker redelivers after a restart (its session "
                "lasts 7 days) could find its key purged and be handled again"
            )
        if hours > IDEMPOTENCY_RETENTION_HOURS_MAX:
            raise ValueError(
                f"{hours} hours is more than the {IDEMPOTENCY_RETENTION_HOURS_MAX} hours "
                "(10 years) maximum"
            )
        return hours


class DiameterSection(_Model):
    listen_host: str = "127.0.0.1"
    listen_port: Annotated[int, Field(ge=0, le=65535)] = 3868
    service_context_id: str = "extrabalance@3gpp.org"
    watchdog_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    request_timeout_ms: Annotated[int, Field(ge=10, le=60_000)] = 2000
    # RFC 6733 §5.6.4: one connection per IN peer, whichever side dialled it, so the
    # node's requests also use the connection an IN dialled to it. Off by default: an
    # IN that does not run the election itself has its second connection refused
    # (docs/diameter.md "Known limits").
    election: bool = False
    # Budget to answer the IN's out-of-balance CCR with an advance; keep it well under
    # the IN's Tx timer (RFC 4006 §13): an advance the IN never receives is never booked.
    advance_answer_deadline_ms: Annotated[int, Field(ge=10, le=60_000)] = 1000
    # Out-of-balance requests being decided at once; beyond it the IN gets 3004 at once.
    out_of_balance_inflight_max: Annotated[int, Field(ge=1, le=100_000)] = 512
    # ... and per subscriber (a flood on a few MSISDNs must not hold everyone's ledger).
    out_of_balance_per_subscriber_max: Annotated[int, Field(ge=1, le=1000)] = 2
    # Every out-of-balance CCR is answered within this (3004 if no decision yet; the
    # decision is not cancelled). Default: three times the advance budget.
    out_of_balance_answer_deadline_ms: Annotated[int, Field(ge=10, le=60_000)] | None = None
    product_name: str = "ExtraBalance"
    vendor_id: int = 0
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    allow_unauthenticated_public_listener: bool = False
    # Connections peers dial to us, at once: in all, and from one address (issue 22).
    inbound_connections_max: Annotated[int, Field(ge=1, le=100_000)] = 256
    inbound_per_client_max: Annotated[int, Field(ge=1, le=10_000)] = 16


class PeerAddr(_Model):
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]


class RangeRule(_Model):
    prefix: Annotated[str, Field(pattern=r"^[0-9]{1,15}$")] | None = None
    start: Annotated[str, Field(pattern=r"^[0-9]{1,15}$")] | None = None
    end: Annotated[str, Field(pattern=r"^[0-9]{1,15}$")] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> RangeRule:
        if self.prefix is None and (self.start is None or self.end is None):
            raise ValueError("a range needs either `prefix` or both `start` and `end`")
        if self.prefix is not None and (self.start is not None or self.end is not None):
            raise ValueError("give `prefix` or `start`/`end`, not both")
        if (self.start is not None and self.end is not None
                and (len(self.start) != len(self.end) or self.start > self.end)):
            raise ValueError(f"range {self.start}..{self.end} is empty or of unequal length")
        return self


UNDELIVERED_HOLD_MAX_S = 86_400.0  # a day: a hold beyond it is a typo


class InNodeSection(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    origin_host: str
    realm: str
    peers: Annotated[list[PeerAddr], Field(min_length=1)]
    ranges: list[RangeRule] = []
    # Opt-in extension, not RFC 4006 (docs/diameter.md "Advance confirmation
    # extension"): after each automatic advance, a REFUND_ACCOUNT under the IN's own
    # Session-Id and CC-Request-Number. Only for an IN built to treat it and the CCA's
    # grant as one operation; to any other IN it is a second credit.
    advance_confirmation: bool = False
    # An automatic advance whose granting CCA could not be handed to this IN's
    # connection (closed or closing) is reversed as never credited this long after,
    # unless an answer to the IN's re-send reached it meanwhile (docs/diameter.md "An
    # answer the node could not deliver"). Longer than the IN's failover window.
    undelivered_advance_hold_s: float = UNDELIVERED_ADVANCE_HOLD_S

    @field_validator("undelivered_advance_hold_s")
    @classmethod
    def _hold_outlives_resends(cls, value: float) -> float:
        if not DUPLICATE_CACHE_TTL_S < value <= UNDELIVERED_HOLD_MAX_S:
            raise ValueError(
                f"undelivered_advance_hold_s must be more than {DUPLICATE_CACHE_TTL_S:g} s "
                f"(the Diameter duplicate cache, which replays a grant to the IN's re-send "
                f"without the ledger; also make it longer than the IN's failover window) "
                f"and at most {UNDELIVERED_HOLD_MAX_S:g} s (a recharge takes nothing for "
                f"the advance meanwhile), got {value:g}")
        return value


class BindSection(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 2775
    system_id: Annotated[str, Field(max_length=15)]
    password_env: str | None = None
    password_file: str | None = None
    system_type: Annotated[str, Field(max_length=12)] = ""
    window_max: Annotated[int, Field(ge=1, le=1000)] = 10
    submit_rate_max_per_s: Annotated[int, Field(ge=1, le=100_000)] = 1000
    enquire_link_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # How long a submit_sm waits for its submit_sm_resp. A late answer still frees
    # the request's window slot; the caller was told at the timeout.
    response_timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    # "idle": enquire_link after enquire_link_s without traffic (SMPP 3.4 §4.11);
    # "periodic": every enquire_link_s, for gateways that poll on their own clock and
    # expect ours too.
    enquire_link_mode: Literal["idle", "periodic"] = "idle"
    # its_session_info sequence of our USSD answers: the received one + 1
    # ("increment") or the received one ("echo"), whichever the gateway expects.
    its_sequence: Literal["increment", "echo"] = "increment"

    def password_source(self) -> str:
        """Where the password is read from, for error messages (never the value)."""
        if self.password_env:
            state = "" if self.password_env in os.environ else ", which is not set"
            return f"environment variable {self.password_env}{state}"
        if self.password_file:
            return f"file {self.password_file}"
        return "nowhere: set password_env or password_file"

    def password(self) -> str:
        value = _secret(self.password_env, self.password_file, f"SMPP bind {self.system_id}") or ""
        if len(value.encode("ascii", "replace")) > SMPP_PASSWORD_MAX:
            raise ConfigError(
                f"smpp.binds ({self.system_id}): the password is longer than "
                f"{SMPP_PASSWORD_MAX} characters, which SMPP 3.4 does not allow"
            )
        return value


class SmppSection(_Model):
    short_code: Annotated[str, Field(pattern=r"^[0-9A-Za-z]{1,21}$")] = "1234"
    ussd_code: Annotated[str, Field(pattern=r"^\*[0-9]+(\*[0-9]+)*#$")] = "*123#"
    ussd_service_type: str = "USSD"
    dialog_id: Literal["its_session_info", "user_message_reference"] = "its_session_info"
    dialog_timeout_s: Annotated[float, Field(gt=0, le=600)] = 60
    # Without a step number (its_session_info) from the gateway, the same USSD text
    # again within this many seconds is its repeat, not a new input (0: off).
    ussd_repeat_window_s: Annotated[float, Field(ge=0, le=30)] = 2.0
    # The same SMS loan request (MSISDN, keyword, amount) again within this many
    # seconds is the SMSC re-sending it: the first outcome is replayed (0: off).
    sms_repeat_window_s: Annotated[float, Field(ge=0, le=3600)] = 120.0
    # A submit_sm whose response timed out may have reached the SMSC: it is sent again
    # at most this many times (each a possible duplicate, counted). 0: never.
    submit_timeout_resends: Annotated[int, Field(ge=0, le=5)] = 0
    dialogs_max: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    # USSD and SMS being handled at once; beyond it deliver_sm gets ESME_RTHROTTLED.
    inbound_tasks_max: Annotated[int, Field(ge=1, le=1_000_000)] = 2000
    ussd_abort_op: Annotated[int, Field(ge=0, le=255)] = 0x81
    sms_long_mode: Literal["udh", "message_payload"] = "udh"
    # Ask the SMSC for a delivery receipt of every SMS (registered_delivery 1); each
    # receipt is a deliver_sm the node answers and matches to what it sent.
    delivery_receipts: bool = True
    # Opt-in: put 16 bits of each outbox message's id in the submit_sm's
    # user_message_reference TLV (SMPP 3.4 §5.3.2.17), the same on every attempt, so
    # an SMSC that keeps it can recognise a message the node sent twice.
    outbox_reference_tlv: bool = False
    binds: list[BindSection] = []


class MqttSection(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    client_id: str = "extrabalance-eb-node-1"
    topics: Annotated[list[str], Field(min_length=1)] = ["extrabalance/recharge/+"]
    dead_letter_topic: str = "extrabalance/recharge/dead"
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    tls: bool = False
    ca_file: str | None = None
    # Recharges handled at once (acknowledged in order, each after its commit). The
    # broker sends at most its own max_inflight_messages: raise both together.
    inflight_max: Annotated[int, Field(ge=1, le=65_535)] = 100
    # Messages read and not yet acknowledged; beyond it the socket is not read, so a
    # backlog stays on the broker and not in the node's memory.
    inbox_max: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    # Several nodes on one ledger: each recharge to one node of the group, through an
    # MQTT shared subscription ($share/<group>/<topic>; the broker must support them:
    # Mosquitto 2.0, EMQX, HiveMQ, VerneMQ). Off (None): every node gets every event.
    shared_group: Annotated[str, Field(pattern=r"^[^/+#\s]+$")] | None = None

    def password(self) -> str | None:
        return _secret(self.password_env, self.password_file, "MQTT")


class AdminSection(_Model):
    listen_host: str = "127.0.0.1"
    listen_port: Annotated[int, Field(ge=0, le=65535)] = 8080
    token_env: str | None = "EB_ADMIN_TOKEN"
    token_file: str | None = None

    def token(self) -> str | None:
        return _secret(self.token_env, self.token_file, "admin token")


class EligibilitySection(_Model):
    min_tenure_days: Annotated[int, Field(ge=0)] = 0
    max_balance_to_borrow_minor: Annotated[int, Field(ge=0)] | None = None
    # Apply that limit by asking the subscriber's IN before each loan: a CHECK_BALANCE
    # (RFC 4006 §5.2.3, Requested-Action 2) for the limit + 1; ENOUGH_CREDIT refuses
    # the loan with BALANCE_TOO_HIGH. Off: the limit is never applied.
    check_balance_at_in: bool = True


class RecoverySection(_Model):
    order: Literal["fee_first", "principal_first"] = "fee_first"
    share_bp: Annotated[int, Field(ge=1, le=10_000)] = 10_000
    min_balance_left_minor: Annotated[int, Field(ge=0)] = 0
    overdue_days: Annotated[int, Field(ge=1)] = 30
    write_off_days: Annotated[int, Field(ge=1)] = 180

    @model_validator(mode="after")
    def _ordered(self) -> RecoverySection:
        if self.write_off_days < self.overdue_days:
            raise ValueError("write_off_days must not be shorter than overdue_days")
        return self


class LimitsSection(_Model):
    """Limits from behaviour (core/limits.py, docs/lending.md): off unless enabled."""

    enabled: bool = False
    window_days: Annotated[int, Field(ge=1, le=366)] = 30
    recharge_share_bp: Annotated[int, Field(ge=0, le=100_000)] = 5_000
    arpu_share_bp: Annotated[int, Field(ge=0, le=100_000)] = 0
    floor_minor: Annotated[int, Field(ge=0)] = 0
    on_time_days: Annotated[int, Field(ge=1)] = 14
    on_time_raise_bp: Annotated[int, Field(ge=0, le=100_000)] = 1_000
    late_lower_bp: Annotated[int, Field(ge=0, le=10_000)] = 2_000
    partial_lower_bp: Annotated[int, Field(ge=0, le=10_000)] = 500
    adjust_min_bp: Annotated[int, Field(ge=-10_000, le=0)] = -5_000
    adjust_max_bp: Annotated[int, Field(ge=0, le=100_000)] = 10_000

    def policy(self) -> LimitPolicy | None:
        if not self.enabled:
            return None
        return LimitPolicy(
            window_days=self.window_days,
            recharge_share_bp=self.recharge_share_bp,
            arpu_share_bp=self.arpu_share_bp,
            floor_minor=self.floor_minor,
            on_time_days=self.on_time_days,
            on_time_raise_bp=self.on_time_raise_bp,
            late_lower_bp=self.late_lower_bp,
            partial_lower_bp=self.partial_lower_bp,
            adjust_min_bp=self.adjust_min_bp,
            adjust_max_bp=self.adjust_max_bp,
        )


class ProtectionSection(_Model):
    """Consumer protection (core/protection.py, docs/lending.md): a jurisdiction's
    preset, any key of which may be set here instead. Unset keys take the preset's
    value; without the section the node behaves as before (payback SMS on)."""

    preset: str = "none"
    fee_percent_required: bool | None = None
    sms_confirm: bool | None = None
    confirm_ttl_s: Annotated[int, Field(ge=30, le=86_400)] | None = None
    recovery_sms: bool | None = None
    loans_per_window_max: Annotated[int, Field(ge=0, le=1_000)] | None = None
    window_hours: Annotated[int, Field(ge=1, le=8_784)] | None = None
    cooling_off_after: Annotated[int, Field(ge=0, le=100)] | None = None
    cooling_off_window_hours: Annotated[int, Field(ge=1, le=8_784)] | None = None
    cooling_off_hours: Annotated[int, Field(ge=1, le=8_784)] | None = None
    double_opt_in: bool | None = None
    bulk_opt_in: bool | None = None
    consent_audit: bool | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str) -> str:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} (one of {', '.join(sorted(PRESETS))})")
        return preset

    def policy(self) -> ProtectionPolicy:
        overrides = {k: v for k, v in self.model_dump().items()
                     if k != "preset" and v is not None}
        return resolve(self.preset, overrides)


class AutoAdvanceSection(_Model):
    tier: int | None = None


class BundleSection(_Model):
    """A bundle tier (docs/lending.md "Bundle advances"): what the IN credits instead
    of money, in the unit of its kind on the wire; `amount_minor` of the tier is its
    money price. At least one of service_identifier and rating_group names the
    service at the IN (RFC 4006 §8.28, §8.29)."""

    kind: Literal["data", "voice", "sms"]
    quantity: Annotated[int, Field(gt=0, le=2**63 - 1)]  # octets, seconds or SMS
    service_identifier: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    rating_group: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None

    @model_validator(mode="after")
    def _names_a_service(self) -> BundleSection:
        if self.service_identifier is None and self.rating_group is None:
            raise ValueError("a bundle needs service_identifier or rating_group")
        if self.kind == "voice" and self.quantity > 2**32 - 1:
            raise ValueError("voice quantity is seconds in CC-Time (Unsigned32)")
        return self

    def bundle(self) -> Bundle:
        return Bundle(self.kind, self.quantity, self.service_identifier, self.rating_group)


class TierSection(_Model):
    id: Annotated[int, Field(ge=1, le=99)]
    amount_minor: Annotated[int, Field(gt=0)]
    bundle: BundleSection | None = None  # off unless configured: a money tier


class FeePlanSection(_Model):
    flat_minor: Annotated[int, Field(ge=0)] = 0
    percent_bp: Annotated[int, Field(ge=0, le=10_000)] = 0
    min_fee_minor: Annotated[int, Field(ge=0)] = 0
    max_fee_minor: Annotated[int, Field(ge=0)] | None = None
    by_tier_minor: dict[int, Annotated[int, Field(ge=0)]] = {}


class ConditionSection(_Model):
    attribute: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    op: RuleOp
    value: int | str | list[int | str]


class SegmentSection(_Model):
    name: str
    conditions: list[ConditionSection] = []
    ceiling_minor: Annotated[int, Field(ge=0)]
    tiers: Annotated[list[int], Field(min_length=1)]
    fee_plan: str
    bad_debt_limit: Annotated[int, Field(ge=1, le=100)]


class QuietHours(_Model):
    start: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
    end: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]


# -- advertisement SMS (issue 7; see docs/ads.md) -------------------------------------
AD_TRIGGERS = ("out_of_balance", "low_balance", "debt_limit", "campaign")
AdTriggerName = Literal["out_of_balance", "low_balance", "debt_limit", "campaign"]


class AdTriggerSection(_Model):
    enabled: bool = True
    max_per_day: Annotated[int, Field(ge=0)] | None = None  # None: only ads.max_per_day


class AdCampaignSection(_Model):
    send_rate_max_per_s: Annotated[int, Field(ge=1)] = 50  # a share of ads.send_rate_max_per_s
    batch_max: Annotated[int, Field(ge=1, le=10_000)] = 500  # recipients read per drain step
    poll_s: Annotated[float, Field(gt=0, le=3600)] = 5.0  # look for queued campaigns


class AdsSection(_Model):
    enabled: bool = True
    max_per_day: Annotated[int, Field(ge=0)] = 2
    min_interval_s: Annotated[int, Field(ge=0)] = 3600
    quiet_hours: QuietHours | None = None
    send_rate_max_per_s: Annotated[int, Field(ge=1)] = 200
    rate_burst: Annotated[int, Field(ge=1)] | None = None  # None: one second's worth
    inflight_max: Annotated[int, Field(ge=1, le=100_000)] = 100  # ads awaiting submit_sm_resp
    debt_limit_share_bp: Annotated[int, Field(ge=1, le=10_000)] = 8000
    low_balance_topics: Annotated[list[str], Field(min_length=1)] = ["extrabalance/lowbalance/+"]
    low_balance_dead_letter_topic: str = "extrabalance/lowbalance/dead"
    triggers: dict[AdTriggerName, AdTriggerSection] = {}
    # segment name -> {base ad template -> template key to use instead}
    segment_templates: dict[str, dict[str, str]] = {}
    campaign: AdCampaignSection = AdCampaignSection()


TEMPLATE_KEYS_REQUIRED = (
    "menu_title", "menu_item", "menu_more", "menu_account", "confirm", "granted_screen",
    "pending_screen", "refused_screen", "cancelled_screen", "expired_screen",
    "invalid_choice", "account_screen", "on", "off", "settings_saved", "loan_granted",
    "loan_refused", "loan_pending", "advance_granted", "payback_partial", "payback_full",
    "barred", "ad_out_of_balance", "balance_reply", "help_reply", "unknown_keyword",
    "ads_stopped", "ads_started", "no_such_amount",
)


class Settings(_Model):
    node: NodeSection
    storage: StorageSection = StorageSection()
    diameter: DiameterSection = DiameterSection()
    in_nodes: Annotated[list[InNodeSection], Field(min_length=1)]
    smpp: SmppSection = SmppSection()
    mqtt: MqttSection = MqttSection()
    admin: AdminSection = AdminSection()
    eligibility: EligibilitySection = EligibilitySection()
    recovery: RecoverySection = RecoverySection()
    auto_advance: AutoAdvanceSection = AutoAdvanceSection()
    limits: LimitsSection = LimitsSection()
    protection: ProtectionSection = ProtectionSection()
    tiers: list[TierSection]
    fee_plans: dict[str, FeePlanSection]
    segments: Annotated[list[SegmentSection], Field(min_length=1)]
    ads: AdsSection = AdsSection()
    templates: dict[str, dict[str, Any]]

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        tier_ids = [t.id for t in self.tiers]
        if len(tier_ids) < TIERS_MIN:
            raise ValueError(f"tiers: {len(tier_ids)} given, at least {TIERS_MIN} required")
        if len(set(tier_ids)) != len(tier_ids):
            raise ValueError("tiers: two tiers share an id")
        for i, seg in enumerate(self.segments):
            if seg.fee_plan not in self.fee_plans:
                raise ValueError(f"segments[{i}].fee_plan: no fee plan named {seg.fee_plan!r}")
            unknown = sorted(set(seg.tiers) - set(tier_ids))
            if unknown:
                raise ValueError(f"segments[{i}].tiers: unknown tier ids {unknown}")
        if self.auto_advance.tier is not None and self.auto_advance.tier not in tier_ids:
            raise ValueError(f"auto_advance.tier: no tier {self.auto_advance.tier}")
        if any(t.id == self.auto_advance.tier and t.bundle is not None for t in self.tiers):
            raise ValueError(f"auto_advance.tier: tier {self.auto_advance.tier} is a bundle; "
                             "the IN's out-of-balance CCR is granted in money")
        if any(t.bundle is not None for t in self.tiers):
            for lang, table in self.templates.items():
                missing = [k for k in BUNDLE_TEMPLATE_KEYS if k not in table]
                if missing:
                    raise ValueError(f"templates.{lang}: missing {', '.join(missing)} "
                                     "(bundle tiers are configured)")
        names = [n.name for n in self.in_nodes]
        if len(set(names)) != len(names):
            raise ValueError("in_nodes: two IN nodes share a name")
        if self.node.default_language not in self.templates:
            raise ValueError(
                f"node.default_language: no [templates.{self.node.default_language}] section"
            )
        for lang, table in self.templates.items():
            missing = [k for k in TEMPLATE_KEYS_REQUIRED if k not in table]
            if missing:
                raise ValueError(f"templates.{lang}: missing {', '.join(missing)}")
        _check_protection(self)
        _check_ads(self)  # issue 7
        if (
            self.diameter.listen_host not in LOOPBACK_HOSTS
            and not (self.diameter.tls_cert_file and self.diameter.tls_key_file)
            and not self.diameter.allow_unauthenticated_public_listener
        ):
            raise ValueError(
                "diameter.listen_host: a non-loopback listener without TLS needs "
                "diameter.allow_unauthenticated_public_listener = true"
            )
        if (
            self.diameter.listen_host not in LOOPBACK_HOSTS
            and self.diameter.tls_cert_file and self.diameter.tls_key_file
            and not self.diameter.tls_ca_file
            and not self.diameter.allow_unauthenticated_public_listener
        ):
            raise ValueError(
                "diameter.tls_ca_file: a non-loopback TLS listener needs the CA that signs "
                "the INs' certificates, or any client could claim to be an IN (RFC 6733 "
                "§13); set it, or diameter.allow_unauthenticated_public_listener = true"
            )
        return self

    # -- conversions to the pure domain types ------------------------------------

    def currency(self) -> Currency:
        return Currency(self.node.currency, self.node.currency_numeric, self.node.currency_exponent)

    def policy(self) -> Policy:
        fee_plans = {
            name: FeePlan(
                name=name,
                flat_minor=p.flat_minor,
                percent_bp=p.percent_bp,
                min_fee_minor=p.min_fee_minor,
                max_fee_minor=p.max_fee_minor,
                by_tier_minor=dict(p.by_tier_minor),
            )
            for name, p in self.fee_plans.items()
        }
        segments = tuple(
            Segment(
                name=s.name,
                conditions=tuple(
                    Condition(
                        c.attribute,
                        c.op,
                        tuple(c.value) if isinstance(c.value, list) else c.value,
                    )
                    for c in s.conditions
                ),
                ceiling_minor=s.ceiling_minor,
                tier_ids=tuple(s.tiers),
                fee_plan=s.fee_plan,
                bad_debt_limit=s.bad_debt_limit,
            )
            for s in self.segments
        )
        return Policy(
            currency=self.currency(),
            tiers={t.id: Tier(t.id, t.amount_minor, t.bundle.bundle() if t.bundle else None)
                   for t in self.tiers},
            fee_plans=fee_plans,
            segments=segments,
            eligibility=EligibilityPolicy(
                self.eligibility.min_tenure_days, self.eligibility.max_balance_to_borrow_minor,
                self.eligibility.check_balance_at_in,
            ),
            recovery=RecoveryPolicy(
                order=PaybackOrder(self.recovery.order),
                share_bp=self.recovery.share_bp,
                min_balance_left_minor=self.recovery.min_balance_left_minor,
                overdue_days=self.recovery.overdue_days,
                write_off_days=self.recovery.write_off_days,
            ),
            auto_advance_tier_id=self.auto_advance.tier,
            limits=self.limits.policy(),
            protection=self.protection.policy(),
        )


# Templates a node with bundle tiers needs in every language (docs/lending.md).
BUNDLE_TEMPLATE_KEYS = ("bundle_data", "bundle_voice", "bundle_sms", "menu_item_bundle",
                        "confirm_bundle", "granted_screen_bundle", "loan_granted_bundle",
                        "loan_confirm_sms_bundle", "no_bundle")


# Templates that show the fee before a confirmation, and what each must show when
# [protection] requires the fee as an amount and a percentage.
FEE_CONFIRM_TEMPLATES = ("confirm", "loan_confirm_sms", "confirm_bundle",
                         "loan_confirm_sms_bundle")


def _check_protection(settings: Settings) -> None:
    protection = settings.protection.policy()
    for lang, table in settings.templates.items():
        if protection.sms_confirm and "loan_confirm_sms" not in table:
            raise ValueError(f"templates.{lang}: missing loan_confirm_sms "
                             "(protection.sms_confirm asks for an SMS confirmation)")
        if protection.double_opt_in and "opt_in_confirm_sms" not in table:
            raise ValueError(f"templates.{lang}: missing opt_in_confirm_sms "
                             "(protection.double_opt_in asks for a reply to an SMS)")
        if not protection.fee_percent_required:
            continue
        for key in FEE_CONFIRM_TEMPLATES:
            text = str(table.get(key, ""))
            if key in table and not ("{fee}" in text and "{fee_percent}" in text):
                raise ValueError(
                    f"templates.{lang}.{key}: protection preset {protection.preset!r} shows "
                    "the fee as an amount and a percentage: the text needs {fee} and "
                    "{fee_percent}")


def _check_ads(settings: Settings) -> None:
    """[ads] against the rest: templates exist in every language, segments exist,
    the ad rate fits what the SMPP binds may submit, the time zone is known."""
    ads = settings.ads
    try:
        ZoneInfo(settings.node.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"node.timezone: unknown time zone {settings.node.timezone!r}") from None
    needed = {f"ad_{t}" for t in AD_TRIGGERS}
    segment_names = {s.name for s in settings.segments}
    for segment, table in ads.segment_templates.items():
        if segment not in segment_names:
            raise ValueError(f"ads.segment_templates.{segment}: no segment named {segment!r}")
        for base, key in table.items():
            if base not in needed:
                raise ValueError(f"ads.segment_templates.{segment}.{base}: not an ad template "
                                 f"({', '.join(sorted(needed))})")
            needed.add(key)
    for lang, table in settings.templates.items():
        missing = sorted(k for k in needed if k not in table)
        if missing:
            raise ValueError(f"templates.{lang}: missing ad template(s) {', '.join(missing)}")
    if ads.campaign.send_rate_max_per_s > ads.send_rate_max_per_s:
        raise ValueError("ads.campaign.send_rate_max_per_s: above ads.send_rate_max_per_s")
    binds_rate = sum(b.submit_rate_max_per_s for b in settings.smpp.binds)
    if settings.smpp.binds and ads.send_rate_max_per_s > binds_rate:
        raise ValueError(f"ads.send_rate_max_per_s: {ads.send_rate_max_per_s}/s is more than the "
                         f"SMPP binds may submit ({binds_rate}/s together)")


def _format_error(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and err["loc"][-1] in ("password", "token"):
            name = err["loc"][-1]
            msg = (f"a {name} is never written in the config: name an environment variable "
                   f"with {name}_env or a file with {name}_file")
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_settings(data: dict[str, Any], source: str = "<config>") -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def default_config_text() -> str:
    return resources.files("extrabalance.defaults").joinpath(DEFAULT_CONFIG_NAME).read_text(
        encoding="utf-8"
    )


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read and validate a config file (the embedded default when `path` is None).

    `overrides` are deep-merged over the file (the demo uses it for ports and paths).
    """
    if path is None:
        source, text = "embedded default config", default_config_text()
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    if overrides:
        data = deep_merge(data, overrides)
    return parse_settings(data, source)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
