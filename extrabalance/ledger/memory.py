"""The in-memory adapter of the unit-of-work port (`extrabalance.service.unit_of_work`).

What this file owns: the ledger's tables as plain dicts, and every `LedgerTx`
operation over them with the invariants the SQLite ledger enforces: every journal
entry balances, idempotency keys, loan idempotency keys and recharge event ids are
unique, every state change is one the saga table (`core/sagas.py`) allows, a unit of
work that raises leaves nothing behind. It serves the service tests (hundreds of
business cases without a database file) and is held to the SQLite adapter by one set
of contract tests (`tests/ledger/test_unit_of_work_contract.py`).

Not for production: nothing is durable, and a unit of work is atomic because it runs
alone on the event-loop thread over a copy of the tables taken before it starts.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from extrabalance.core import journal, sagas
from extrabalance.core.adjustments import (
    AdjustmentError,
    AdjustmentResult,
    check_request,
    spread_write_down,
)
from extrabalance.core.limits import LimitState
from extrabalance.core.model import OpenLoan, SubscriberProfile, SubscriberState
from extrabalance.core.payback import Recovery
from extrabalance.core.policy import Bundle
from extrabalance.core.sagas import (
    ACTIVE,
    CONFIRMING,
    DONE,
    FAILED,
    LOAN_JOURNALLED_STATES,
    LOAN_OPEN_STATES,
    LOAN_UNSETTLED_STATES,
    RECOVERING,
    RECOVERY_UNSETTLED_STATES,
    WRITTEN_OFF,
    LedgerInvariantError,
)
from extrabalance.ledger import ads_store
from extrabalance.ledger.ads_store import AdSubscriberRow, AudienceRow, CampaignRow, utc_ts
from extrabalance.ledger.outbox_store import OutboxRow
from extrabalance.ledger.store import (
    ACCOUNTS,
    AUDIT_TRAIL_MAX,
    IDEMPOTENCY_KEPT_PREFIX,
    AuditRow,
    LoadedSubscriber,
    LoanRow,
    RecoveryRow,
    new_id,
    ts,
)

if TYPE_CHECKING:
    from extrabalance.service.unit_of_work import LedgerTx

T = TypeVar("T")


class DuplicateKey(LedgerInvariantError):
    """A second row for a unique key (the SQLite ledger raises its IntegrityError)."""


class ReadOnly(RuntimeError):
    """A read (`read`, `read_point`) tried to write."""


@dataclass(slots=True)
class _Subscriber:
    msisdn: str
    updated_at: str
    tenure_days: int | None = None
    arpu_minor: int | None = None
    attributes: dict[str, str | int] = field(default_factory=dict)
    language: str | None = None
    auto_advance_opt_in: bool = False
    ads_opt_out: bool = False
    barred_manual: bool = False
    barred_reason: str | None = None
    loans_since_full_payback: int = 0
    learned_in_node: str | None = None


@dataclass(slots=True)
class _Line:
    tx_id: str
    line_no: int
    account: str
    msisdn: str
    amount_minor: int
    loan_id: str | None
    recovery_id: str | None
    memo: str
    created_at: str


@dataclass(slots=True)
class _Tables:
    subscribers: dict[str, _Subscriber] = field(default_factory=dict)
    loans: dict[str, LoanRow] = field(default_factory=dict)
    loan_keys: dict[str, str] = field(default_factory=dict)  # idempotency_key → loan_id
    loan_changed: dict[str, str] = field(default_factory=dict)  # loan_id → updated_at
    recoveries: dict[str, RecoveryRow] = field(default_factory=dict)
    recovery_events: dict[str, str] = field(default_factory=dict)  # event_id → id
    recovery_created: dict[str, str] = field(default_factory=dict)
    # (recovery_id, attempt_no) → [session_id, requested, outcome, result_code]
    attempts: dict[tuple[str, int], list[Any]] = field(default_factory=dict)
    journal: list[_Line] = field(default_factory=list)
    idempotency: dict[str, tuple[str, str]] = field(default_factory=dict)  # → (json, at)
    audit: list[dict[str, Any]] = field(default_factory=list)
    limits: dict[str, tuple[LimitState, str]] = field(default_factory=dict)  # → (state, at)
    dnd: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # → (source, by, at)
    ads_sent: dict[str, tuple[str, str, str, str, str | None]] = field(default_factory=dict)
    campaigns: dict[str, CampaignRow] = field(default_factory=dict)
    # (campaign_id, msisdn) → (state, reason, updated_at)
    recipients: dict[tuple[str, str], tuple[str, str | None, str]] = field(default_factory=dict)
    # (campaign_id, msisdn) → claimed_until text (migration 0013)
    recipient_claims: dict[tuple[str, str], str] = field(default_factory=dict)
    # outbox_id → [row, next_attempt_at text, sent_at text or None]
    outbox: dict[str, list[Any]] = field(default_factory=dict)
    # loan_id → (session_id, request_type, request_number, used_minor, created_at)
    session_evidence: dict[str, tuple[str, int, int, int | None, str]] = field(
        default_factory=dict)
    # loan_id → [msisdn, undelivered_at, delivered_at, closed_at] (texts or None):
    # migration 0015
    answer_marks: dict[str, list[str | None]] = field(default_factory=dict)
    # ("loans" | "recoveries", id) → (owner_node, lease_until text): migration 0011
    leases: dict[tuple[str, str], tuple[str | None, str | None]] = field(default_factory=dict)


def _ts_or_none(moment: datetime | None) -> str | None:
    return ts(moment) if moment is not None else None


class MemoryLedgerTx:
    """One unit of work over the tables (see the module docstring)."""

    def __init__(self, tables: _Tables, *, writable: bool) -> None:
        self._t = tables
        self._writable = writable

    def _w(self) -> _Tables:
        if not self._writable:
            raise ReadOnly("a read unit of work tried to write")
        return self._t

    def ping(self) -> None:
        """Nothing to reach: the tables are in this process."""

    # -- subscribers -------------------------------------------------------------------

    def _ensure(self, msisdn: str, now: datetime) -> _Subscriber:
        t = self._w()
        sub = t.subscribers.get(msisdn)
        if sub is None:
            sub = t.subscribers[msisdn] = _Subscriber(msisdn, ts(now))
        return sub

    def open_loans(self, msisdn: str) -> tuple[OpenLoan, ...]:
        rows = [
            r for r in self._t.loans.values() if r.msisdn == msisdn and r.state in LOAN_OPEN_STATES
        ]
        rows.sort(key=lambda r: (r.created_at, r.loan_id))
        return tuple(
            OpenLoan(
                r.loan_id,
                r.tier_id,
                r.principal_minor,
                r.fee_minor,
                r.principal_repaid_minor,
                r.fee_repaid_minor,
                datetime.fromisoformat(r.created_at),
            )
            for r in rows
        )

    def _has_unsettled(self, msisdn: str) -> bool:
        return any(
            r.msisdn == msisdn and r.state in LOAN_UNSETTLED_STATES for r in self._t.loans.values()
        ) or self._recovery_unsettled(msisdn)

    def _recovery_unsettled(self, msisdn: str) -> bool:
        return any(
            r.msisdn == msisdn and r.state in RECOVERY_UNSETTLED_STATES
            for r in self._t.recoveries.values()
        )

    def load_subscriber(
        self, msisdn: str, *, balance_minor: int | None = None, default_language: str = "en"
    ) -> LoadedSubscriber:
        loans = self.open_loans(msisdn)
        live = [r for r in self._t.loans.values() if r.msisdn == msisdn]
        loan_pending = any(r.state in LOAN_UNSETTLED_STATES for r in live)
        confirming = any(r.state == CONFIRMING for r in live)
        recovery_pending = confirming or self._recovery_unsettled(msisdn)
        pending = loan_pending or recovery_pending
        sub = self._t.subscribers.get(msisdn)
        if sub is None:
            state = SubscriberState(
                msisdn,
                None,
                loans,
                operation_pending=pending,
                language=default_language,
                balance_minor=balance_minor,
            )
            return LoadedSubscriber(state, False, None, recovery_pending)
        profile = None
        if sub.tenure_days is not None:
            profile = SubscriberProfile(
                msisdn, sub.tenure_days, sub.arpu_minor or 0, dict(sub.attributes)
            )
        state = SubscriberState(
            msisdn=msisdn,
            profile=profile,
            open_loans=loans,
            loans_since_full_payback=sub.loans_since_full_payback,
            barred_manual=sub.barred_manual,
            barred_reason=sub.barred_reason,
            operation_pending=pending,
            auto_advance_opt_in=sub.auto_advance_opt_in,
            ads_opt_out=sub.ads_opt_out,
            language=sub.language or default_language,
            balance_minor=balance_minor,
        )
        return LoadedSubscriber(state, True, sub.learned_in_node, recovery_pending)

    def put_profile(self, profile: SubscriberProfile, now: datetime) -> None:
        sub = self._ensure(profile.msisdn, now)
        sub.tenure_days = profile.tenure_days
        sub.arpu_minor = profile.arpu_minor
        sub.attributes = dict(profile.attributes)
        sub.updated_at = ts(now)

    def debt_owed(self, msisdn: str) -> int:
        return sum(
            r.principal_minor - r.principal_repaid_minor + r.fee_minor - r.fee_repaid_minor
            for r in self._t.loans.values()
            if r.msisdn == msisdn and r.state in LOAN_JOURNALLED_STATES
        )

    def learn_route(self, msisdn: str, in_node: str, now: datetime) -> None:
        sub = self._ensure(msisdn, now)
        sub.learned_in_node = in_node
        sub.updated_at = ts(now)

    def learned_route(self, msisdn: str) -> str | None:
        sub = self._t.subscribers.get(msisdn)
        return sub.learned_in_node if sub else None

    def limit_state(self, msisdn: str) -> LimitState:
        kept = self._t.limits.get(msisdn)
        return kept[0] if kept else LimitState()

    def put_limit_state(self, msisdn: str, state: LimitState, now: datetime) -> None:
        self._w().limits[msisdn] = (state, ts(now))

    def dnd_listed(self, msisdn: str) -> bool:
        return msisdn in self._t.dnd

    def dnd_add(self, msisdns: Iterable[str], source: str, who: str, now: datetime) -> int:
        dnd, added = self._w().dnd, 0
        for msisdn in msisdns:
            if msisdn not in dnd:
                dnd[msisdn] = (source, who, utc_ts(now))
                added += 1
        return added

    def dnd_remove(self, msisdn: str) -> bool:
        return self._w().dnd.pop(msisdn, None) is not None

    def dnd_page(self, after_msisdn: str, limit: int) -> list[tuple[str, str, str, str]]:
        rows = sorted((m, *v) for m, v in self._t.dnd.items() if m > after_msisdn)
        return rows[: min(max(limit, 0), ads_store.DND_PAGE_MAX)]

    def set_preferences(
        self,
        msisdn: str,
        now: datetime,
        *,
        auto_advance: bool | None = None,
        ads_opt_out: bool | None = None,
        language: str | None = None,
    ) -> None:
        sub = self._ensure(msisdn, now)
        if auto_advance is not None:
            sub.auto_advance_opt_in = auto_advance
        if ads_opt_out is not None:
            sub.ads_opt_out = ads_opt_out
        if language is not None:
            sub.language = language
        sub.updated_at = ts(now)

    def audit(
        self,
        msisdn: str,
        action: str,
        who: str,
        why: str,
        now: datetime,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        self._w().audit.append(
            {
                "audit_id": new_id(),
                "msisdn": msisdn,
                "action": action,
                "who": who,
                "why": why,
                "detail": json.loads(json.dumps(detail or {})),
                "created_at": ts(now),
            }
        )

    def audit_trail(
        self, msisdn: str, actions: tuple[str, ...] = (), limit: int = AUDIT_TRAIL_MAX
    ) -> list[AuditRow]:
        rows = [a for a in self._t.audit
                if a["msisdn"] == msisdn and (not actions or a["action"] in actions)]
        rows.sort(key=lambda a: (a["created_at"], a["audit_id"]))
        rows = rows[len(rows) - max(0, min(limit, AUDIT_TRAIL_MAX)):] if limit > 0 else []
        return [AuditRow(a["audit_id"], a["action"], a["who"], a["why"], dict(a["detail"]),
                         datetime.fromisoformat(a["created_at"])) for a in rows]

    def loan_times(self, msisdn: str, since: datetime) -> tuple[datetime, ...]:
        after = ts(since)
        return tuple(sorted(
            datetime.fromisoformat(r.created_at) for r in self._t.loans.values()
            if r.msisdn == msisdn and r.created_at >= after and r.state != FAILED))

    def set_bar(
        self, msisdn: str, barred: bool, reason: str | None, who: str, now: datetime
    ) -> None:
        sub = self._ensure(msisdn, now)
        sub.barred_manual = barred
        sub.barred_reason = reason if barred else None
        sub.updated_at = ts(now)
        self.audit(msisdn, "bar" if barred else "unbar", who, reason or "", now)

    # -- idempotency -------------------------------------------------------------------

    def idempotent_get(self, key: str) -> dict[str, Any] | None:
        found = self._t.idempotency.get(key)
        return json.loads(found[0]) if found else None

    def idempotent_put(self, key: str, outcome: Mapping[str, Any], now: datetime) -> None:
        t = self._w()
        if key not in t.idempotency:
            t.idempotency[key] = (json.dumps(dict(outcome), sort_keys=True), ts(now))

    def idempotent_replace(self, key: str, outcome: Mapping[str, Any], now: datetime) -> None:
        t = self._w()
        first = t.idempotency.get(key)
        t.idempotency[key] = (
            json.dumps(dict(outcome), sort_keys=True),
            first[1] if first else ts(now),
        )

    def purge_idempotency(self, before: datetime, limit: int) -> int:
        t = self._w()
        cutoff = ts(before)
        old = sorted(
            (at, key)
            for key, (_, at) in t.idempotency.items()
            if at < cutoff and not key.startswith(IDEMPOTENCY_KEPT_PREFIX)
        )[:limit]
        for _, key in old:
            del t.idempotency[key]
        return len(old)

    # -- journal -----------------------------------------------------------------------

    def _post(
        self,
        lines: Iterable[tuple[str, int]],
        *,
        msisdn: str,
        memo: str,
        now: datetime,
        loan_id: str | None = None,
        recovery_id: str | None = None,
    ) -> str:
        entries = [(account, amount) for account, amount in lines if amount != 0]
        if sum(amount for _, amount in entries) != 0:
            raise LedgerInvariantError(f"unbalanced journal entry {memo}: {entries}")
        for account, _ in entries:
            if account not in ACCOUNTS:
                raise LedgerInvariantError(f"no account {account!r}")
        tx_id = new_id()
        self._w().journal.extend(
            _Line(tx_id, n, account, msisdn, amount, loan_id, recovery_id, memo, ts(now))
            for n, (account, amount) in enumerate(entries)
        )
        return tx_id

    def debt_from_journal(self, msisdn: str) -> int:
        return sum(
            line.amount_minor
            for line in self._t.journal
            if line.msisdn == msisdn and line.account in ("principal_receivable", "fee_receivable")
        )

    def account_totals(self) -> dict[str, int]:
        totals = dict.fromkeys(ACCOUNTS, 0)
        for line in self._t.journal:
            totals[line.account] += line.amount_minor
        return totals

    def journal_entries(self, msisdn: str) -> list[tuple[str, str, int]]:
        return [
            (line.tx_id, line.account, line.amount_minor)
            for line in self._t.journal
            if line.msisdn == msisdn
        ]

    # -- loans -------------------------------------------------------------------------

    def get_loan(self, loan_id: str) -> LoanRow | None:
        return self._t.loans.get(loan_id)

    def loan_by_idempotency_key(self, key: str) -> LoanRow | None:
        loan_id = self._t.loan_keys.get(key)
        return self._t.loans[loan_id] if loan_id else None

    def _put_loan(self, loan: LoanRow, now: datetime) -> LoanRow:
        t = self._w()
        t.loans[loan.loan_id] = loan
        t.loan_changed[loan.loan_id] = ts(now)
        return loan

    def insert_loan(
        self,
        *,
        msisdn: str,
        tier_id: int,
        principal_minor: int,
        fee_minor: int,
        state: str,
        channel: str,
        idempotency_key: str | None,
        in_node: str | None,
        session_id: str | None,
        now: datetime,
        request_number: int = 0,
        loan_id: str | None = None,
        subscriber_known: bool = False,
        owner_node: str | None = None,
        lease_until: datetime | None = None,
        bundle: Bundle | None = None,
    ) -> str:
        sagas.check_loan_move(None, state, loan_id or "")
        t = self._w()
        loan_id = loan_id or new_id()
        if loan_id in t.loans:
            raise DuplicateKey(f"loan {loan_id} exists")
        if idempotency_key is not None and idempotency_key in t.loan_keys:
            raise DuplicateKey(f"a loan for {idempotency_key} exists")
        if principal_minor < 0 or fee_minor < 0:
            raise LedgerInvariantError("a loan's amounts are never negative")
        self._ensure(msisdn, now)
        self._put_loan(
            LoanRow(
                loan_id,
                msisdn,
                tier_id,
                principal_minor,
                fee_minor,
                0,
                0,
                state,
                channel,
                idempotency_key,
                in_node,
                session_id,
                request_number,
                0,
                False,
                ts(now),
                bundle,
            ),
            now,
        )
        if idempotency_key is not None:
            t.loan_keys[idempotency_key] = loan_id
        t.leases[("loans", loan_id)] = (owner_node, _ts_or_none(lease_until))
        if state in (ACTIVE, CONFIRMING):
            self._disburse(loan_id, msisdn, principal_minor, fee_minor, now)
        return loan_id

    def _disburse(
        self, loan_id: str, msisdn: str, principal_minor: int, fee_minor: int, now: datetime
    ) -> None:
        self._post(
            journal.disbursement(principal_minor, fee_minor),
            msisdn=msisdn,
            memo="disburse",
            now=now,
            loan_id=loan_id,
        )
        sub = self._ensure(msisdn, now)
        sub.loans_since_full_payback += 1
        sub.updated_at = ts(now)

    def settle_loan(
        self, loan_id: str, new_state: str, now: datetime, *, result_code: int | None = None
    ) -> LoanRow:
        loan = self._t.loans.get(loan_id)
        if loan is None:
            raise KeyError(loan_id)
        if loan.state == new_state:
            return loan
        if loan.state == CONFIRMING or new_state == CONFIRMING:
            raise LedgerInvariantError(f"loan {loan_id}: advances settle through settle_advance")
        sagas.loan_step(
            loan.state, sagas.settlement_event(new_state, sagas.LOAN_SETTLEMENTS, loan_id), loan_id
        )
        settled = self._put_loan(replace(loan, state=new_state), now)
        if new_state == ACTIVE:
            self._disburse(loan_id, loan.msisdn, loan.principal_minor, loan.fee_minor, now)
        return settled

    def settle_advance(
        self,
        loan_id: str,
        confirmed: bool,
        now: datetime,
        *,
        result_code: int | None = None,
        never_credited: bool = False,
    ) -> LoanRow:
        loan = self._t.loans.get(loan_id)
        if loan is None:
            raise KeyError(loan_id)
        new_state = ACTIVE if confirmed else FAILED
        if loan.state == new_state:
            return loan
        event = sagas.advance_settlement_event(
            loan.state, confirmed, never_credited=never_credited, channel=loan.channel,
            repaid_minor=loan.principal_repaid_minor + loan.fee_repaid_minor)
        sagas.loan_step(loan.state, event, loan_id)
        settled = self._put_loan(replace(loan, state=new_state), now)
        if not confirmed:
            self._post(
                journal.reversal(loan.principal_minor, loan.fee_minor),
                msisdn=loan.msisdn,
                memo="advance_reversed",
                now=now,
                loan_id=loan_id,
            )
            sub = self._ensure(loan.msisdn, now)
            sub.loans_since_full_payback = max(0, sub.loans_since_full_payback - 1)
            sub.updated_at = ts(now)
        return settled

    def record_session_evidence(
        self, loan_id: str, session_id: str, request_type: int, request_number: int,
        used_minor: int | None, now: datetime,
    ) -> bool:
        t = self._w()
        if loan_id not in t.loans:
            raise KeyError(loan_id)  # the table's foreign key
        if loan_id in t.session_evidence:
            return False
        t.session_evidence[loan_id] = (
            session_id, request_type, request_number, used_minor, ts(now))
        return True

    def session_evidence(self, loan_id: str) -> tuple[int, int, int | None] | None:
        row = self._t.session_evidence.get(loan_id)
        return (row[1], row[2], row[3]) if row else None

    def _open_mark(self, loan_id: str) -> list[str | None] | None:
        mark = self._t.answer_marks.get(loan_id)
        if mark is None or mark[1] is None or mark[2] is not None or mark[3] is not None:
            return None
        return mark

    def _new_mark(self, loan_id: str) -> list[str | None]:
        t = self._w()
        loan = t.loans.get(loan_id)
        if loan is None:
            raise KeyError(loan_id)  # the table's foreign key
        mark: list[str | None] = [loan.msisdn, None, None, None]
        t.answer_marks[loan_id] = mark
        return mark

    def mark_answer_undelivered(self, loan_id: str, now: datetime) -> bool:
        mark = self._w().answer_marks.get(loan_id) or self._new_mark(loan_id)
        if mark[2] is not None or mark[3] is not None:
            return False
        mark[1] = ts(now)
        return True

    def mark_answer_delivered(self, loan_id: str, now: datetime) -> bool:
        mark = self._w().answer_marks.get(loan_id) or self._new_mark(loan_id)
        if mark[2] is not None:
            return False
        was_open = mark[1] is not None and mark[3] is None
        mark[2] = ts(now)
        return was_open

    def _set_open_mark(self, loan_id: str, column: int, now: datetime) -> bool:
        self._w()
        mark = self._open_mark(loan_id)
        if mark is None:
            return False
        mark[column] = ts(now)
        return True

    def restart_answer_hold(self, loan_id: str, now: datetime) -> bool:
        return self._set_open_mark(loan_id, 1, now)

    def close_answer_mark(self, loan_id: str, now: datetime) -> bool:
        return self._set_open_mark(loan_id, 3, now)

    def answer_mark_open_since(self, loan_id: str) -> datetime | None:
        mark = self._open_mark(loan_id)
        return None if mark is None or mark[1] is None else datetime.fromisoformat(mark[1])

    def undelivered_loan_ids(self, msisdn: str) -> frozenset[str]:
        return frozenset(loan_id for loan_id, mark in self._t.answer_marks.items()
                         if mark[0] == msisdn and self._open_mark(loan_id) is not None)

    def undelivered_due(self, before: datetime, limit: int) -> list[tuple[str, str]]:
        at = ts(before)
        rows = sorted((str(mark[1]), loan_id, str(mark[0]))
                      for loan_id, mark in self._t.answer_marks.items()
                      if self._open_mark(loan_id) is not None and str(mark[1]) <= at)
        return [(loan_id, msisdn) for _at, loan_id, msisdn in rows[:limit]]

    def advances_of_in_node(self, in_node: str, until: datetime) -> list[LoanRow]:
        at = ts(until)
        rows = [r for r in self._t.loans.values()
                if r.channel == "auto" and r.in_node == in_node and r.created_at <= at]
        return sorted(rows, key=lambda r: r.created_at)

    def unsettled_loans(self, limit: int) -> list[LoanRow]:
        rows = [
            r
            for r in self._t.loans.values()
            if r.state in LOAN_UNSETTLED_STATES and not r.needs_review
        ]
        return sorted(rows, key=lambda r: r.created_at)[:limit]

    def note_resolve_attempt(self, table: str, key: str, review_after: int, now: datetime) -> bool:
        t = self._w()
        row: LoanRow | RecoveryRow
        if table == "loans":
            row = t.loans[key]
        elif table == "recoveries":
            row = t.recoveries[key]
        else:
            raise KeyError(table)
        attempts = row.resolve_attempts + 1
        flagged = attempts >= review_after
        row = replace(row, resolve_attempts=attempts, needs_review=row.needs_review or flagged)
        if isinstance(row, LoanRow):
            t.loans[key] = row
        else:
            t.recoveries[key] = row
        if flagged:
            self.audit(
                row.msisdn,
                "review",
                "resolver",
                f"{table} {key} unresolved after {attempts} attempts",
                now,
            )
        return flagged

    def write_off_candidates(self, before: datetime, limit: int) -> list[tuple[str, str]]:
        cutoff = ts(before)
        rows = sorted(
            (
                r
                for r in self._t.loans.values()
                if r.state in LOAN_OPEN_STATES and r.created_at < cutoff
            ),
            key=lambda r: r.created_at,
        )
        return [(r.msisdn, r.loan_id) for r in rows[:limit]]

    def write_off(self, loan_id: str, who: str, now: datetime) -> int:
        loan = self._t.loans.get(loan_id)
        if loan is None or loan.state not in LOAN_OPEN_STATES:
            return 0
        if self._has_unsettled(loan.msisdn):
            return 0
        sagas.loan_step(loan.state, sagas.WRITE_OFF, loan_id)
        fee_left = loan.fee_minor - loan.fee_repaid_minor
        principal_left = loan.principal_minor - loan.principal_repaid_minor
        self._post(
            journal.write_off(fee_left, principal_left),
            msisdn=loan.msisdn,
            memo="write_off",
            now=now,
            loan_id=loan_id,
        )
        self._put_loan(replace(loan, state=WRITTEN_OFF), now)
        self.audit(
            loan.msisdn,
            "write_off",
            who,
            f"loan {loan_id} aged",
            now,
            {"loan_id": loan_id, "amount_minor": fee_left + principal_left},
        )
        return fee_left + principal_left

    def write_down(
        self,
        msisdn: str,
        *,
        kind: str,
        amount_minor: int,
        who: str,
        reason: str,
        now: datetime,
        loan_id: str | None = None,
        request_id: str | None = None,
    ) -> AdjustmentResult:
        key = IDEMPOTENCY_KEPT_PREFIX + request_id if request_id else None
        if key is not None:
            first = self.idempotent_get(key)
            if first is not None:
                return AdjustmentResult.replay(first, msisdn)
        check_request(kind, amount_minor, who, reason)
        if self._has_unsettled(msisdn):
            raise AdjustmentError(
                "an operation for this subscriber is still unsettled; retry later")
        parts = spread_write_down(self.open_loans(msisdn), kind, amount_minor, loan_id)
        debt_before = self.debt_from_journal(msisdn)
        lines: list[tuple[str, int]] = []
        touched: list[dict[str, Any]] = []
        for part in parts:
            loan = self._t.loans[part.loan_id]
            event = sagas.WRITE_OFF if part.cleared else sagas.WAIVE_PART
            state = sagas.loan_step(loan.state, event, loan.loan_id)
            self._put_loan(replace(
                loan, state=state,
                fee_repaid_minor=loan.fee_repaid_minor + part.fee_minor,
                principal_repaid_minor=loan.principal_repaid_minor + part.principal_minor,
            ), now)
            lines += [("fee_receivable", -part.fee_minor),
                      ("principal_receivable", -part.principal_minor)]
            touched.append({"loan_id": part.loan_id, "fee_minor": part.fee_minor,
                            "principal_minor": part.principal_minor, "state": state})
        tx_id = self._post([("written_off", amount_minor), *lines], msisdn=msisdn,
                           memo=f"adjust_{kind}", now=now,
                           loan_id=touched[0]["loan_id"] if len(touched) == 1 else None)
        debt_after = self.debt_from_journal(msisdn)
        if debt_after != debt_before - amount_minor or debt_after < 0:
            raise LedgerInvariantError(
                f"adjustment for {msisdn}: debt {debt_before} - {amount_minor} != {debt_after}")
        result = AdjustmentResult(tx_id, msisdn, kind, amount_minor, debt_before, debt_after,
                                  tuple(touched))
        self.audit(msisdn, "adjust", who, reason, now,
                   {"kind": kind, "amount_minor": amount_minor, "tx_id": tx_id,
                    "loans": touched, "request_id": request_id})
        if key is not None:
            self.idempotent_put(key, result.as_dict(), now)
        return result

    def count_overdue(self, created_before: datetime, created_since: datetime) -> int:
        high, low = ts(created_before), ts(created_since)
        return sum(
            1
            for r in self._t.loans.values()
            if r.state in LOAN_OPEN_STATES and low <= r.created_at < high
        )

    # -- recoveries --------------------------------------------------------------------

    def get_recovery(self, recovery_id: str) -> RecoveryRow | None:
        return self._t.recoveries.get(recovery_id)

    def recovery_by_event(self, event_id: str) -> RecoveryRow | None:
        recovery_id = self._t.recovery_events.get(event_id)
        return self._t.recoveries[recovery_id] if recovery_id else None

    def insert_recovery(
        self,
        *,
        event_id: str,
        msisdn: str,
        recharge_minor: int,
        balance_after_minor: int | None,
        in_node: str | None,
        now: datetime,
        session_id: str | None = None,
        requested_minor: int = 0,
        owner_node: str | None = None,
        lease_until: datetime | None = None,
    ) -> str:
        sagas.recovery_step(None, sagas.BOOK_RECOVERY)
        t = self._w()
        if event_id in t.recovery_events:
            raise DuplicateKey(f"a recovery for recharge {event_id} exists")
        recovery_id = new_id()
        first = session_id is not None
        t.recoveries[recovery_id] = RecoveryRow(
            recovery_id,
            event_id,
            msisdn,
            recharge_minor,
            balance_after_minor,
            requested_minor if first else 0,
            0,
            RECOVERING,
            in_node,
            session_id,
            0,
            1 if first else 0,
            0,
            False,
        )
        t.recovery_events[event_id] = recovery_id
        t.recovery_created[recovery_id] = ts(now)
        t.leases[("recoveries", recovery_id)] = (owner_node, _ts_or_none(lease_until))
        if first:
            t.attempts[(recovery_id, 1)] = [session_id, requested_minor, None, None]
        return recovery_id

    def start_recovery_attempt(
        self, recovery_id: str, session_id: str, requested_minor: int, now: datetime
    ) -> int:
        t = self._w()
        rec = t.recoveries.get(recovery_id)
        if rec is None:
            raise KeyError(recovery_id)
        sagas.recovery_step(rec.state, sagas.NEXT_ATTEMPT, recovery_id)
        rec = replace(
            rec,
            attempts=rec.attempts + 1,
            diameter_session_id=session_id,
            requested_minor=requested_minor,
            request_number=0,
            state=RECOVERING,
        )
        t.recoveries[recovery_id] = rec
        t.attempts[(recovery_id, rec.attempts)] = [session_id, requested_minor, None, None]
        return rec.attempts

    def note_recovery_attempt(
        self,
        recovery_id: str,
        outcome: str,
        result_code: int | None,
        attempt_no: int | None = None,
    ) -> None:
        t = self._w()
        if attempt_no is None:
            rec = t.recoveries.get(recovery_id)
            if rec is None:
                return
            attempt_no = rec.attempts
        row = t.attempts.get((recovery_id, attempt_no))
        if row is not None:
            row[2], row[3] = outcome, result_code

    def set_recovery_state(self, recovery_id: str, state: str, now: datetime) -> None:
        event = sagas.settlement_event(state, sagas.RECOVERY_SETTLEMENTS, recovery_id)
        t = self._w()
        rec = t.recoveries.get(recovery_id)
        if rec is None:
            raise KeyError(recovery_id)
        if rec.state == state:
            return
        sagas.recovery_step(rec.state, event, recovery_id)
        t.recoveries[recovery_id] = replace(rec, state=state)

    def apply_recovery(self, rec: RecoveryRow, allocation: Recovery, now: datetime) -> None:
        t = self._w()
        current = t.recoveries.get(rec.recovery_id)
        if current is None:
            raise KeyError(rec.recovery_id)
        sagas.recovery_step(current.state, sagas.IN_DEBITED, rec.recovery_id)
        if sum(p.total_minor for p in allocation.parts) != allocation.total_minor:
            raise LedgerInvariantError(f"recovery {rec.recovery_id}: parts do not add up")
        for part in allocation.parts:
            loan = t.loans.get(part.loan_id)
            if (
                loan is None
                or loan.msisdn != current.msisdn
                or loan.state not in LOAN_OPEN_STATES
                or part.fee_minor < 0
                or part.principal_minor < 0
                or part.fee_minor > loan.fee_minor - loan.fee_repaid_minor
                or part.principal_minor > loan.principal_minor - loan.principal_repaid_minor
            ):
                raise LedgerInvariantError(
                    f"recovery {rec.recovery_id}: {part} is not owed on an open loan"
                )
            self._post(
                journal.recovery(part.fee_minor, part.principal_minor),
                msisdn=current.msisdn,
                memo="recover",
                now=now,
                loan_id=part.loan_id,
                recovery_id=rec.recovery_id,
            )
            fee_repaid = loan.fee_repaid_minor + part.fee_minor
            principal_repaid = loan.principal_repaid_minor + part.principal_minor
            cleared = fee_repaid == loan.fee_minor and principal_repaid == loan.principal_minor
            event = sagas.REPAID_ALL if cleared else sagas.REPAID_PART
            self._put_loan(
                replace(
                    loan,
                    fee_repaid_minor=fee_repaid,
                    principal_repaid_minor=principal_repaid,
                    state=sagas.loan_step(loan.state, event, loan.loan_id),
                ),
                now,
            )
        t.recoveries[rec.recovery_id] = replace(
            current, recovered_minor=allocation.total_minor, state=DONE
        )
        sub = t.subscribers.get(current.msisdn)
        if allocation.clears_all and sub is not None:  # a full payback lifts the bar
            sub.loans_since_full_payback = 0
            sub.updated_at = ts(now)

    def unsettled_recoveries(self, limit: int) -> list[RecoveryRow]:
        rows = [
            r
            for r in self._t.recoveries.values()
            if r.state in RECOVERY_UNSETTLED_STATES
            and not r.needs_review
            and r.diameter_session_id is not None
        ]
        rows.sort(key=lambda r: self._t.recovery_created[r.recovery_id])
        return rows[:limit]

    # -- leases on the sagas -------------------------------------------------------------

    def _claim(self, table: str, keys: list[str], owner: str, now: datetime,
               lease_until: datetime, limit: int) -> list[str]:
        """The first `limit` of `keys` (oldest first) `owner` may take, leased to him."""
        t = self._w()
        claimed: list[str] = []
        for key in keys:
            if len(claimed) >= limit:
                break
            holder, until = t.leases.get((table, key), (None, None))
            if holder is None or holder == owner or (until is not None and until < ts(now)):
                t.leases[(table, key)] = (owner, ts(lease_until))
                claimed.append(key)
        return claimed

    def claim_unsettled_loans(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[LoanRow]:
        # Every unsettled row, not the first `limit`: those leased elsewhere are skipped.
        rows = self.unsettled_loans(len(self._t.loans))
        keys = self._claim("loans", [r.loan_id for r in rows], owner, now, lease_until, limit)
        return sorted((self._t.loans[k] for k in keys), key=lambda r: (r.created_at, r.loan_id))

    def claim_unsettled_recoveries(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[RecoveryRow]:
        rows = self.unsettled_recoveries(len(self._t.recoveries))
        keys = self._claim("recoveries", [r.recovery_id for r in rows], owner, now,
                           lease_until, limit)
        return sorted((self._t.recoveries[k] for k in keys),
                      key=lambda r: (self._t.recovery_created[r.recovery_id], r.recovery_id))

    def saga_lease(self, table: str, key: str) -> tuple[str | None, str | None]:
        return self._t.leases.get((table, key), (None, None))

    # -- advertisements ----------------------------------------------------------------

    def load_ad_subscriber(self, msisdn: str) -> AdSubscriberRow | None:
        sub = self._t.subscribers.get(msisdn)
        if sub is None:
            return None
        profile = None
        if sub.tenure_days is not None:
            profile = SubscriberProfile(
                msisdn, sub.tenure_days, sub.arpu_minor or 0, dict(sub.attributes)
            )
        return AdSubscriberRow(
            profile, sub.ads_opt_out, sub.barred_manual, sub.loans_since_full_payback, sub.language
        )

    def recent_ads(self, msisdn: str, since: datetime) -> list[tuple[datetime, str]]:
        cutoff = utc_ts(since)
        found = sorted(
            (at, trigger)
            for (m, at, trigger, _, _) in self._t.ads_sent.values()
            if m == msisdn and at >= cutoff
        )
        return [(ads_store.parse_ts(at), trigger) for at, trigger in found]

    def record_ad(
        self,
        msisdn: str,
        trigger: str,
        template: str,
        now: datetime,
        campaign_id: str | None = None,
    ) -> str:
        ad_id = new_id()
        self._w().ads_sent[ad_id] = (msisdn, utc_ts(now), trigger, template, campaign_id)
        return ad_id

    def prune_ads(self, before: datetime, limit: int) -> int:
        t = self._w()
        cutoff = utc_ts(before)
        old = sorted((at, ad_id) for ad_id, (_, at, _, _, _) in t.ads_sent.items() if at < cutoff)
        for _, ad_id in old[:limit]:
            del t.ads_sent[ad_id]
        return len(old[:limit])

    # -- campaigns ---------------------------------------------------------------------

    def audience_chunk(self, after_msisdn: str, limit: int) -> list[AudienceRow]:
        borrowed = {r.msisdn for r in self._t.loans.values() if r.state != FAILED}
        rows = []
        for msisdn in sorted(self._t.subscribers):
            sub = self._t.subscribers[msisdn]
            if (
                msisdn <= after_msisdn
                or sub.tenure_days is None
                or sub.ads_opt_out
                or sub.barred_manual
                or msisdn in borrowed
            ):
                continue
            profile = SubscriberProfile(
                msisdn, sub.tenure_days, sub.arpu_minor or 0, dict(sub.attributes)
            )
            rows.append(AudienceRow(msisdn, profile, sub.loans_since_full_payback))
            if len(rows) >= min(limit, ads_store.AUDIENCE_CHUNK_MAX):
                break
        return rows

    def create_campaign(
        self, template: str, segment: str | None, created_by: str, now: datetime
    ) -> str:
        campaign_id = new_id()[:16]
        self._w().campaigns[campaign_id] = CampaignRow(
            campaign_id, template, segment, ads_store.PREPARING, 0, 0, 0, created_by, utc_ts(now)
        )
        return campaign_id

    def add_recipients(self, campaign_id: str, msisdns: Iterable[str], now: datetime) -> int:
        t = self._w()
        stamp = utc_ts(now)
        added = 0
        for msisdn in msisdns:
            if (campaign_id, msisdn) not in t.recipients:
                t.recipients[(campaign_id, msisdn)] = (ads_store.PENDING, None, stamp)
                added += 1
        row = t.campaigns[campaign_id]
        t.campaigns[campaign_id] = replace(row, recipients=row.recipients + added)
        return added

    def get_campaign(self, campaign_id: str) -> CampaignRow | None:
        return self._t.campaigns.get(campaign_id)

    def list_campaigns(self, limit: int = 50) -> list[CampaignRow]:
        rows = sorted(self._t.campaigns.values(), key=lambda r: r.created_at, reverse=True)
        return rows[:limit]

    def active_campaigns(self) -> list[CampaignRow]:
        rows = [
            r for r in self._t.campaigns.values() if r.state in ads_store.CAMPAIGN_ACTIVE_STATES
        ]
        return sorted(rows, key=lambda r: r.created_at)

    def set_campaign_state(self, campaign_id: str, state: str, now: datetime) -> None:
        t = self._w()
        row = t.campaigns.get(campaign_id)
        if row is not None:
            t.campaigns[campaign_id] = replace(row, state=state)

    def pending_recipients(self, campaign_id: str, limit: int) -> list[str]:
        found = sorted(
            m
            for (c, m), (state, _, _) in self._t.recipients.items()
            if c == campaign_id and state == ads_store.PENDING
        )
        return found[:limit]

    def claim_recipients(self, campaign_id: str, now: datetime, until: datetime,
                         limit: int) -> list[str]:
        t = self._w()
        at = utc_ts(now)
        free = sorted(
            m for (c, m), (state, _, _) in t.recipients.items()
            if c == campaign_id and state == ads_store.PENDING
            and t.recipient_claims.get((c, m), at) <= at
        )[:max(limit, 0)]
        for msisdn in free:
            t.recipient_claims[(campaign_id, msisdn)] = utc_ts(until)
        return free

    def settle_recipient(
        self, campaign_id: str, msisdn: str, state: str, reason: str | None, now: datetime
    ) -> bool:
        t = self._w()
        current = t.recipients.get((campaign_id, msisdn))
        if current is None or current[0] != ads_store.PENDING:
            return False
        t.recipients[(campaign_id, msisdn)] = (state, reason, utc_ts(now))
        row = t.campaigns[campaign_id]
        if state == ads_store.SENT:
            t.campaigns[campaign_id] = replace(row, sent=row.sent + 1)
        else:
            t.campaigns[campaign_id] = replace(row, suppressed=row.suppressed + 1)
        return True

    # -- outbox --------------------------------------------------------------------------

    def outbox_put(
        self,
        *,
        msisdn: str,
        template: str,
        params: Mapping[str, str | int],
        kind: str,
        language: str,
        now: datetime,
    ) -> str:
        outbox_id = new_id()
        # Stored as the SQL adapter reads it back: params through JSON, time in UTC.
        row = OutboxRow(outbox_id, msisdn, template, json.loads(json.dumps(dict(params))),
                        kind, language, now, 0)
        self._w().outbox[outbox_id] = [row, utc_ts(now), None]
        return outbox_id

    def outbox_due(self, now: datetime, limit: int) -> list[OutboxRow]:
        at = utc_ts(now)
        due = sorted(
            ((entry[1], oid) for oid, entry in self._t.outbox.items()
             if entry[2] is None and entry[1] <= at)
        )
        return [self._t.outbox[oid][0] for _, oid in due[:limit]]

    def outbox_claim_due(self, now: datetime, until: datetime, limit: int) -> list[OutboxRow]:
        t = self._w()
        rows = self.outbox_due(now, limit)
        for row in rows:
            t.outbox[row.outbox_id][1] = utc_ts(until)
        return sorted(rows, key=lambda row: (row.created_at, row.outbox_id))

    def outbox_retry_later(self, outbox_id: str, at: datetime) -> None:
        entry = self._w().outbox.get(outbox_id)
        if entry is not None and entry[2] is None:
            entry[0] = replace(entry[0], attempts=entry[0].attempts + 1)
            entry[1] = utc_ts(at)

    def outbox_mark_sent(self, outbox_id: str, now: datetime) -> bool:
        entry = self._w().outbox.get(outbox_id)
        if entry is None or entry[2] is not None:
            return False
        entry[0] = replace(entry[0], attempts=entry[0].attempts + 1)
        entry[2] = utc_ts(now)
        return True

    def outbox_prune(self, before: datetime, limit: int) -> int:
        t = self._w()
        at = utc_ts(before)
        old = sorted((e[2], oid) for oid, e in t.outbox.items() if e[2] is not None and e[2] < at)
        for _, oid in old[:limit]:
            del t.outbox[oid]
        return len(old[:limit])


class MemoryUnitOfWork:
    """The port over in-memory tables: `write` runs a unit alone over a copy of the
    tables and keeps the copy only if it returns (all or nothing)."""

    def __init__(self) -> None:
        self.tables = _Tables()
        self.writes = 0  # units of work committed

    def write_now(self, fn: Callable[[LedgerTx], T]) -> T:
        """`write`, without an event loop (property tests, tools)."""
        work = copy.deepcopy(self.tables)
        value = fn(MemoryLedgerTx(work, writable=True))
        self.tables = work
        self.writes += 1
        return value

    async def write(self, fn: Callable[[LedgerTx], T]) -> T:
        return self.write_now(fn)

    async def write_staged(self, fn: Callable[[LedgerTx], T]) -> tuple[T, asyncio.Future[T]]:
        value = self.write_now(fn)
        durable: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        durable.set_result(value)
        return value, durable

    def write_later(self, fn: Callable[[LedgerTx], T]) -> asyncio.Future[T]:
        """`write` at once (nothing here is worth deferring), as a resolved future."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        try:
            done.set_result(self.write_now(fn))
        except Exception as exc:  # noqa: BLE001 - the caller's future carries it
            done.set_exception(exc)
        return done

    async def read(self, fn: Callable[[LedgerTx], T]) -> T:
        return fn(MemoryLedgerTx(self.tables, writable=False))

    async def read_point(self, fn: Callable[[LedgerTx], T]) -> T:
        return fn(MemoryLedgerTx(self.tables, writable=False))

    async def close(self) -> None:
        """Nothing to release (the SQLite ledger's `close`, for symmetric tests)."""


if TYPE_CHECKING:  # mypy holds the adapter to the port

    def _conforms(tx: MemoryLedgerTx, uow: MemoryUnitOfWork) -> None:
        from extrabalance.service.unit_of_work import UnitOfWork

        _tx: LedgerTx = tx
        _uow: UnitOfWork = uow
