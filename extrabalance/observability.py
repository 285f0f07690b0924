"""Logs, metrics and event detail records (EDRs).

- Logs: structlog, one JSON object per line, with `msisdn` masked unless the operator
  turns masking off (`node.mask_msisdn_in_logs`).
- Metrics: a Prometheus registry per node (not the process-global one, so tests and
  the demo can run several nodes in one process).
- EDRs: one CSV line per business event, for billing and BI; one file per UTC day,
  with a header line; the schema is `EDR_FIELDS` and docs/operations.md describes it.
  The full MSISDN is written: EDRs are billing records, kept under the operator's
  access rules, unlike logs.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from extrabalance.clock import SYSTEM_CLOCK, Clock
from extrabalance.private_files import open_private, private_dir

log = structlog.get_logger(__name__)

EDR_FIELDS = (
    "time", "node", "kind", "msisdn", "channel", "tier_id", "amount_minor", "fee_minor",
    "recovered_minor", "debt_after_minor", "reason", "loan_id", "recovery_id", "event_id",
    "in_node", "template", "detail", "limit_minor", "limit_reason",
    # Added at the end (older files are a prefix of this header, see report.read_edrs).
    "bundle_kind", "bundle_quantity",
)
# Every kind of business event the services emit (a test reads the sources to keep
# this list whole); docs/operations.md says what each means.
EDR_KINDS = frozenset({
    "loan", "refusal", "loan_pending", "advance", "advance_confirmed", "advance_reversed",
    "advance_session_evidence",
    "payback", "payback_pending", "recharge", "ad_sent", "ad_suppressed", "bar", "unbar", "write_off",
    "adjustment", "review",
})
EDR_BUFFER_MAX = 1000  # lines held before a flush is forced
# Lines held while flushes fail (about 200 bytes each: 40 MB); past it the oldest are
# lost, counted and logged. A node that cannot write its EDRs for that long is not ready.
EDR_PENDING_LINES_MAX = 200_000


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell a spreadsheet will not run: text that starts with
    `= + - @` (or a tab or CR) gets a leading `'` (OWASP's CSV-injection rule), unless it
    is a plain number such as `-500`. None is the empty cell."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS) and not (
            _PLAIN_NUMBER.fullmatch(value)):
        return "'" + value
    return value


def mask_msisdn(msisdn: str) -> str:
    """`201001234567` → `2010*****567`: enough to tell lines apart, not to call them."""
    if len(msisdn) <= 6:
        return "*" * len(msisdn)
    return msisdn[:4] + "*" * (len(msisdn) - 7) + msisdn[-3:]


LOG_REPEATS_PER_S = 5  # lines of one kind (logger + message template) per second at most
LOG_KINDS_TRACKED_MAX = 1000


class RepeatLimiter(logging.Filter):
    """Bounds the log lines of one kind per second, so a peer sending garbage (each
    message answered and logged by the protocol stack) cannot fill the disk. The
    first line after a quiet second says how many were dropped."""

    def __init__(self, per_s: int = LOG_REPEATS_PER_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.per_s = per_s
        self._clock = clock
        self._windows: dict[tuple[str, str], list[float | int]] = {}  # key → [second, count, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = (record.name, str(record.msg))
        second = int(self._clock())
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= LOG_KINDS_TRACKED_MAX:
                self._windows.clear()
            window = self._windows[key] = [second, 0, 0]
        if window[0] != second:
            dropped = int(window[2])
            window[:] = [second, 0, 0]
            if dropped:
                record.msg = f"{record.msg} (and {dropped} more like it in the last second)"
        window[1] = int(window[1]) + 1
        if window[1] > self.per_s:
            window[2] = int(window[2]) + 1
            return False
        return True


class _CurrentStderr:
    """Whatever `sys.stderr` is when a line is written, not when logging was set up: a
    process (or a test harness) that swaps stderr later still gets the lines, and a
    stream closed since is never written to."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _clock_stamper(clock: Clock) -> structlog.typing.Processor:
    """The log line's `timestamp` (ISO 8601, UTC, microseconds) read from the node's
    clock: a node run with `--clock-start` logs the instants it decides by."""

    def stamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["timestamp"] = clock.now().isoformat().replace("+00:00", "Z")
        return event

    return stamp


def configure_logging(*, mask_msisdn_in_logs: bool = True, level: str = "INFO",
                      stream: Any = None, clock: Clock = SYSTEM_CLOCK) -> None:
    def _mask(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        value = event.get("msisdn")
        if mask_msisdn_in_logs and isinstance(value, str):
            event["msisdn"] = mask_msisdn(value)
        return event

    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        _clock_stamper(clock),
        _mask,
        structlog.processors.format_exc_info,
    ]
    # The protocol stacks log through the standard library: the same JSON lines.
    stream = stream or _CurrentStderr()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=structlog.processors.JSONRenderer(),
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
    ))
    handler.addFilter(RepeatLimiter())
    numeric = logging.getLevelName(level.strip().upper())  # "info" as well as "INFO"
    if not isinstance(numeric, int):  # an unknown name comes back as a string
        raise ValueError(f"log level {level!r}: use DEBUG, INFO, WARNING or ERROR")  # noqa: TRY004
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.loans = Counter("eb_loans", "Loans granted", ["channel"], registry=r)
        self.lent_minor = Counter("eb_lent_minor", "Principal lent, minor units", registry=r)
        self.fees_minor = Counter("eb_fees_minor", "Fees charged, minor units", registry=r)
        self.refusals = Counter("eb_refusals", "Loan requests refused", ["reason"], registry=r)
        self.paybacks = Counter("eb_paybacks", "Paybacks", ["kind"], registry=r)
        self.recovered_minor = Counter("eb_recovered_minor", "Recovered, minor units", registry=r)
        self.ads = Counter("eb_ads", "Advertisement SMS", ["outcome", "reason"], registry=r)
        self.bars = Counter("eb_bars", "Bars and unbars", ["action"], registry=r)
        self.write_offs = Counter("eb_write_offs", "Loans written off", registry=r)
        self.edr_write_failures = Counter(
            "eb_edr_write_failures", "EDR flushes that failed (lines kept and retried)",
            registry=r)
        self.background_failures = Counter(
            "eb_background_failures", "Background tasks that ended with an error", ["task"],
            registry=r)
        self.events = Counter("eb_events", "Business events by kind", ["kind"], registry=r)
        self.outstanding_minor = Gauge("eb_outstanding_minor", "Debt outstanding", registry=r)
        self.in_latency = Histogram(
            "eb_in_request_seconds", "Node to IN Diameter request latency", ["action"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.ussd_latency = Histogram(
            "eb_ussd_step_seconds", "USSD input to next screen", buckets=(
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r,
        )
        self.recharges = Counter("eb_recharges", "Recharge events", ["outcome"], registry=r)
        self.idempotency_purged = Counter(
            "eb_idempotency_purged", "Idempotency keys purged past their retention", registry=r
        )
        self.peer_up = Gauge("eb_diameter_peer_up", "Diameter peer open", ["peer"], registry=r)
        self.bind_up = Gauge("eb_smpp_bind_up", "SMPP bind bound", ["bind"], registry=r)
        # Counts since start, read from the SMPP side when scraped (docs/smpp.md,
        # "Gateways as they really behave"): ussd_repeats, sms_repeats,
        # submit_timeouts, late_responses, timeout_resends (duplicate risk),
        # timeout_given_up, connect_failures, connections_lost, balance_checks_above_limit.
        self.smpp_events = Gauge("eb_smpp_gateway_events", "Gateway behaviour seen, since start",
                                 ["kind"], registry=r)
        # Advances whose granting CCA could not be handed to the IN's connection, since
        # start (docs/diameter.md "An answer the node could not deliver"): marked,
        # cleared, reversed, left_for_review.
        self.undelivered_advances = Gauge(
            "eb_advance_answers_undelivered",
            "Advances whose granting answer never reached the IN, since start", ["kind"],
            registry=r)
        # Per Diameter peer, since start (docs/diameter.md "Peer warnings"):
        # cea_unknown_peer, unexpected_origin_host, cer_unknown_peer, late_answer.
        self.peer_warnings = Gauge("eb_diameter_peer_warnings",
                                   "Diameter peer identity problems and late answers, since start",
                                   ["peer", "kind"], registry=r)
        # Labelled children already looked up: `labels()` validates and locks on
        # every call, and a loan updates four labelled metrics. As many entries as
        # the registry holds children.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found


class EdrWriter:
    """Buffered CSV writer, one file per UTC day: `<dir>/edr-YYYYMMDD.csv`.

    A line is never dropped because the disk or the process's file table said no: a
    flush that fails (no free descriptor, disk full, directory gone) keeps every line
    it held, logs the error once per streak, counts it (`failures`, and the
    `eb_edr_write_failures` metric), shows it in `health()` (and so in /readyz), and
    the next flush tries again. Only past `EDR_PENDING_LINES_MAX` lines held would a
    line be lost, and then it is counted and logged as such.
    """

    def __init__(self, directory: str | Path, node: str,
                 clock: Callable[[], float] = SYSTEM_CLOCK.time,
                 failure_counter: Counter | None = None) -> None:
        self.directory = Path(directory)
        self.node = node
        self._clock = clock
        self._failure_counter = failure_counter
        # Lines of the current UTC day, written by one CSV writer into one buffer; a
        # new day moves the old day's lines to `_pending` first.
        self._out = io.StringIO()
        self._csv = csv.writer(self._out, lineterminator="\n")
        self._lines = 0
        self._day_number = -1
        self._day = ""
        self._pending: dict[str, list[tuple[str, int]]] = {}  # day → (text, lines) unwritten
        self.pending_lines = 0
        self.failures = 0  # flushes that failed, ever
        self.failing_since: float | None = None  # clock of the first failure of a streak
        self.last_error: str | None = None
        self.lost_lines = 0  # only past EDR_PENDING_LINES_MAX
        try:
            private_dir(self.directory)
        except OSError as exc:  # the next flush retries (and reports) it
            self._failed(exc)

    def path_for(self, day: str) -> Path:
        return self.directory / f"edr-{day}.csv"

    def write(self, kind: str, fields: dict[str, Any]) -> None:
        stamp = self._clock()
        now = datetime.fromtimestamp(stamp, UTC)
        day_number = int(stamp // 86_400)
        if day_number != self._day_number:
            self._hold_current()
            self._day_number, self._day = day_number, now.strftime("%Y%m%d")
        row = {name: fields.get(name, "") for name in EDR_FIELDS}
        row.update(time=now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                   node=self.node, kind=kind)
        self._csv.writerow(csv_cell(row[name]) for name in EDR_FIELDS)
        self._lines += 1
        if self._lines >= EDR_BUFFER_MAX:
            self.flush()

    def _hold_current(self) -> None:
        if not self._lines:
            return
        self._pending.setdefault(self._day, []).append((self._out.getvalue(), self._lines))
        self.pending_lines += self._lines
        self._out.seek(0)
        self._out.truncate()
        self._lines = 0
        while self.pending_lines > EDR_PENDING_LINES_MAX:  # memory is bounded too
            day = next(iter(self._pending))
            _, lines = self._pending[day].pop(0)
            if not self._pending[day]:
                del self._pending[day]
            self.pending_lines -= lines
            self.lost_lines += lines
            log.error("edr_lines_lost", lines=lines, held_max=EDR_PENDING_LINES_MAX,
                       error=self.last_error)

    def flush(self) -> bool:
        """Write every held line; True when nothing is left held. Never raises."""
        self._hold_current()
        while self._pending:
            day = next(iter(self._pending))
            chunks = self._pending[day]
            text = "".join(t for t, _ in chunks)
            lines = sum(n for _, n in chunks)
            try:
                private_dir(self.directory)
                path = self.path_for(day)
                new = not path.exists()
                with open_private(path, "a", encoding="utf-8", newline="") as fh:
                    if new:
                        fh.write(",".join(EDR_FIELDS) + "\n")
                    fh.write(text)
            except Exception as exc:  # noqa: BLE001 - held, logged, counted, retried
                self._failed(exc)
                return False
            del self._pending[day]
            self.pending_lines -= lines
        if self.failing_since is not None:
            log.info(
                "edr_write_recovered", failed_for_s=round(self._clock() - self.failing_since, 3))
            self.failing_since = None
            self.last_error = None
        return True

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self._failure_counter is not None:
            self._failure_counter.inc()
        error = f"{type(exc).__name__}: {exc}"
        if self.failing_since is None or error != self.last_error:
            log.error(
                "edr_write_failed", directory=str(self.directory), error=error,
                lines_held=self.pending_lines)
        if self.failing_since is None:
            self.failing_since = self._clock()
        self.last_error = error

    def health(self) -> dict[str, Any]:
        """For /readyz: ok while no flush is failing."""
        return {"ok": self.failing_since is None, "lines_held": self.pending_lines + self._lines,
                "write_failures": self.failures, "lost_lines": self.lost_lines,
                "error": self.last_error}


class EventRecorder:
    """The service layer's `EventSink`: each business event → EDR line + metrics."""

    def __init__(self, metrics: Metrics, edr: EdrWriter | None) -> None:
        self.metrics = metrics
        self.edr = edr
        self.log = structlog.get_logger("extrabalance.events")

    def emit(self, kind: str, **fields: Any) -> None:
        """One business event: its fields carry the EDR columns' names (`EDR_FIELDS`);
        any other field goes to the debug log only."""
        m = self.metrics
        m.child(m.events, kind).inc()
        if kind in ("loan", "advance"):
            m.child(m.loans, fields.get("channel") or ("auto" if kind == "advance" else "")).inc()
            m.lent_minor.inc(int(fields.get("amount_minor") or 0))
            m.fees_minor.inc(int(fields.get("fee_minor") or 0))
        elif kind == "refusal":
            m.child(m.refusals, str(fields.get("reason", ""))).inc()
        elif kind == "payback":
            full = fields.get("debt_after_minor") in (0, "0")
            m.child(m.paybacks, "full" if full else "partial").inc()
            m.recovered_minor.inc(int(fields.get("recovered_minor") or 0))
        elif kind in ("ad_sent", "ad_suppressed"):
            m.ads.labels("sent" if kind == "ad_sent" else "suppressed",
                         str(fields.get("reason", ""))).inc()
        elif kind in ("bar", "unbar"):
            m.bars.labels(kind).inc()
        elif kind == "write_off":
            m.write_offs.inc()
        if self.edr is not None:
            self.edr.write(kind, fields)
        # The EDR is the record of business events; the log line is for debugging only
        # (a JSON line per event costs about as much as the EDR and metrics together).
        if logging.root.isEnabledFor(logging.DEBUG):
            self.log.debug(kind, **{k: v for k, v in fields.items() if v not in (None, "")})
