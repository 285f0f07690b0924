"""In-memory fakes of the IN, the notifier and the event sink, plus a harness that
wires the services over a real (temporary) ledger."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from extrabalance.core.policy import Policy
from extrabalance.ledger import Ledger, store
from extrabalance.service.accounts import AccountService
from extrabalance.service.lending import LendingService
from extrabalance.service.locks import SubscriberLocks
from extrabalance.service.ports import InAction, InOperation, InOutcome, InResult, Notice
from extrabalance.service.recovery import PaybackService
from extrabalance.service.resolver import Resolver
from extrabalance.service.routing import Router, RouteRule
from tests.core.sample import NOW, POLICY


class SimulatedCrash(BaseException):
    """The node process dies here (BaseException: no `except Exception` catches it)."""


# Fault kinds, applied to the next IN calls in order.
REFUSE = "refuse"  # final refusal, not applied (4012 / 4010)
NOT_EXECUTED = "not_executed"  # 3004 TOO_BUSY: not applied, not remembered
TIMEOUT = "timeout"  # request lost before the IN: not applied, answer UNKNOWN
LOST_ANSWER = "lost_answer"  # applied, answer lost: UNKNOWN
CRASH_BEFORE = "crash_before"  # node dies before the request leaves
CRASH_AFTER = "crash_after"  # IN applies, node dies before it reads the answer
FAULTS = (REFUSE, NOT_EXECUTED, TIMEOUT, LOST_ANSWER, CRASH_BEFORE, CRASH_AFTER)


def credit_key(session_id: str, request_number: int) -> str:
    """How FakeIn.credits and Harness granted_sessions name one credit: the Session-Id
    (the node's own credits always use CC-Request-Number 0), plus the number when an
    advance's out-of-balance CCR was not the session's first."""
    return session_id if request_number == 0 else f"{session_id}#{request_number}"


@dataclass
class FakeIn:
    """A prepaid IN that honours Session-Id + CC-Request-Number deduplication of the
    node's own requests (RFC 4006 and nothing else, by default): a grant in a CCA
    (`apply_grant`) is credited once per out-of-balance request, and a REFUND_ACCOUNT
    is a credit of its own whatever Session-Id it carries.
    `confirmation_extension`: the IN of docs/diameter.md "Advance confirmation
    extension", which keys a CCA's grant as the REFUND_ACCOUNT under its CCR's key."""

    balances: dict[str, int] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # msisdn -> in_node, when strict
    faults: deque[str] = field(default_factory=deque)
    answers: dict[tuple[str, int], InResult] = field(default_factory=dict)
    credits: dict[str, int] = field(default_factory=dict)  # credit_key -> credited
    debits: dict[str, int] = field(default_factory=dict)  # session_id -> debited
    calls: list[InOperation] = field(default_factory=list)
    confirmation_extension: bool = False
    credits_applied: int = 0  # every credit, grants and REFUND_ACCOUNTs alike
    grants: set[tuple[str, int]] = field(default_factory=set)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def new_session_id(self) -> str:
        return f"eb.node;1;{next(self._ids)}"

    def fail_next(self, *kinds: str) -> None:
        self.faults.extend(kinds)

    def apply_grant(
        self, session_id: str, request_number: int, msisdn: str, amount_minor: int
    ) -> bool:
        """The CCA with Granted-Service-Unit for the IN's out-of-balance CCR reached
        the IN in time: credit it once per request. With the extension, not if that
        key was executed already (the node's confirmation came first), and remember it
        as a REFUND_ACCOUNT 2001 so the confirmation is a duplicate. True if credited now."""
        key = (session_id, request_number)
        if key in self.grants or (self.confirmation_extension and key in self.answers):
            return False
        self.grants.add(key)
        self.balances[msisdn] = self.balances.get(msisdn, 0) + amount_minor
        self.credits[credit_key(session_id, request_number)] = amount_minor
        self.credits_applied += 1
        if self.confirmation_extension:
            self.answers[key] = InResult(InOutcome.DONE, 2001, amount_minor)
        return True

    async def execute(self, op: InOperation) -> InResult:
        self.calls.append(op)
        fault = self.faults.popleft() if self.faults else None
        if fault == CRASH_BEFORE:
            raise SimulatedCrash
        if fault == TIMEOUT:
            return InResult(InOutcome.UNKNOWN)
        if fault == NOT_EXECUTED:
            return InResult(InOutcome.NOT_EXECUTED, 3004)
        key = (op.session_id, op.request_number)
        first = self.answers.get(key)
        if first is None:
            first = self._apply(op, refuse=fault == REFUSE)
            self.answers[key] = first
        if fault == LOST_ANSWER:
            return InResult(InOutcome.UNKNOWN)
        if fault == CRASH_AFTER:
            raise SimulatedCrash
        return first

    def _apply(self, op: InOperation, *, refuse: bool) -> InResult:
        owner = self.owners.get(op.msisdn)
        if owner is not None and owner != op.in_node:
            return InResult(InOutcome.REFUSED, 5030)
        balance = self.balances.get(op.msisdn, 0)
        if op.action is InAction.REFUND_ACCOUNT:
            if refuse:
                return InResult(InOutcome.REFUSED, 4010)
            self.balances[op.msisdn] = balance + op.amount_minor
            self.credits[credit_key(op.session_id, op.request_number)] = op.amount_minor
            self.credits_applied += 1
            return InResult(InOutcome.DONE, 2001, op.amount_minor)
        if op.action is InAction.DIRECT_DEBITING:
            if refuse or balance < op.amount_minor:
                return InResult(InOutcome.REFUSED, 4012)
            self.balances[op.msisdn] = balance - op.amount_minor
            self.debits[op.session_id] = op.amount_minor
            return InResult(InOutcome.DONE, 2001, op.amount_minor)
        return InResult(InOutcome.DONE, 2001, None, balance >= op.amount_minor)


@dataclass
class FakeNotifier:
    """The SMSC side (`notify`) and, for the service tests, the outbox too: `put`
    writes the outbox row in the unit of work like the node's `OutboxSender` and
    counts the notice as sent when the service wakes the outbox after its commit (no
    background sender runs here; `sent` lists those and what was notified directly,
    `delivered` what `notify` took). The sender itself is tested
    over a real ledger in tests/service/test_outbox.py."""

    sent: list[Notice] = field(default_factory=list)
    queued: list[Notice] = field(default_factory=list)  # put, not yet woken (committed)
    delivered: list[Notice] = field(default_factory=list)
    broken: bool = False
    wakes: int = 0

    async def notify(self, notice: Notice) -> None:
        if self.broken:
            raise ConnectionError("SMSC down")
        self.delivered.append(notice)
        if notice.outbox_id is None:  # sent directly (bars, ads): queued and delivered
            self.sent.append(notice)

    def put(self, tx: Any, notice: Notice, now: datetime) -> str:
        outbox_id: str = tx.outbox_put(msisdn=notice.msisdn, template=notice.template,
                                       params=notice.params, kind=notice.kind,
                                       language=notice.language, now=now)
        self.queued.append(notice)
        return outbox_id

    def wake(self) -> None:
        """The services wake the outbox once their unit is committed: what they
        queued counts as sent from then on."""
        self.wakes += 1
        self.sent.extend(self.queued)
        self.queued.clear()

    def templates(self, msisdn: str | None = None) -> list[str]:
        return [n.template for n in self.sent if msisdn is None or n.msisdn == msisdn]


@dataclass
class ListEvents:
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def emit(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]


class Clock:
    def __init__(self, start: datetime = NOW) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


ROUTES = [
    RouteRule("in-a.operator.example", prefix="2010"),
    RouteRule("in-b.operator.example", prefix="2011"),
]


class Harness:
    """Services over a real ledger in `db_path`, with fake ports. `restart()` drops
    every in-memory object and re-opens the same database, as after a crash."""

    def __init__(
        self,
        db_path: Path,
        policy: Policy = POLICY,
        *,
        fake_in: FakeIn | None = None,
        clock: Clock | None = None,
        batch_window_ms: float = 0.5,
        review_after_attempts: int = 5,
        advance_confirmation: bool = False,
    ) -> None:
        # advance_confirmation: IN_A and IN_B implement the confirmation extension
        # (the node confirms their advances; the fake IN keys grant and confirmation as one).
        self.advance_confirmation_nodes = (
            frozenset(r.in_node for r in ROUTES) if advance_confirmation else frozenset())
        self.review_after_attempts = review_after_attempts
        self.db_path = db_path
        self.policy = policy
        self.fake_in = fake_in or FakeIn(confirmation_extension=advance_confirmation)
        self.notifier = FakeNotifier()
        self.events = ListEvents()
        self.clock = clock or Clock()
        self.batch_window_ms = batch_window_ms
        self._open()

    def _open(self) -> None:
        self.ledger = Ledger(self.db_path, batch_window_ms=self.batch_window_ms)
        self.locks = SubscriberLocks()
        self.router = Router(ROUTES)
        common = (self.ledger, self.fake_in, self.notifier, self.events, self.policy)
        self.lending = LendingService(
            *common, self.router, self.clock, locks=self.locks, confirm_retry_delays_s=(0.0, 0.0),
            advance_confirmation_nodes=self.advance_confirmation_nodes,
        )
        self.payback = PaybackService(*common, self.router, self.clock, locks=self.locks)
        self.resolver = Resolver(
            *common, self.clock, locks=self.locks, review_after_attempts=self.review_after_attempts,
            advance_confirmation_nodes=self.advance_confirmation_nodes,
        )
        self.accounts = AccountService(
            self.ledger, self.notifier, self.events, self.policy, self.clock, locks=self.locks
        )

    async def restart(self) -> None:
        # A crash: background confirmations die with the process (their advances stay
        # CONFIRMING for the resolver).
        self.lending.abandon_confirmations()
        await self.lending.drain_confirmations()
        await self.ledger.close()
        self._open()

    async def close(self) -> None:
        await self.lending.drain_sagas()
        self.lending.abandon_confirmations()
        await self.lending.drain_confirmations()
        await self.ledger.close()

    # -- set-up and checks -------------------------------------------------------

    async def add_profile(
        self, msisdn: str, tenure_days: int = 400, arpu_minor: int = 6000, **attributes: str | int
    ) -> None:
        import json

        now = self.clock()

        def upsert(conn: Any) -> None:
            conn.execute(
                "INSERT INTO subscribers (msisdn, tenure_days, arpu_minor, attributes,"
                " updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (msisdn) DO UPDATE SET"
                " tenure_days = excluded.tenure_days, arpu_minor = excluded.arpu_minor,"
                " attributes = excluded.attributes",
                (msisdn, tenure_days, arpu_minor, json.dumps(attributes), store.ts(now)),
            )

        await self.ledger.write(upsert)

    async def check_invariants(self) -> dict[str, Any]:
        """The money invariants; returns figures for further assertions."""

        def gather(conn: Any) -> dict[str, Any]:
            unbalanced = conn.execute(
                "SELECT tx_id FROM journal GROUP BY tx_id HAVING SUM(amount_minor) <> 0"
            ).fetchall()
            assert unbalanced == [], f"unbalanced transactions {unbalanced}"
            per_sub = conn.execute(
                "SELECT msisdn, SUM(amount_minor) FROM journal WHERE account IN"
                " ('principal_receivable', 'fee_receivable') GROUP BY msisdn"
            ).fetchall()
            for msisdn, debt in per_sub:
                assert debt >= 0, f"negative debt {msisdn} {debt}"
                cached = conn.execute(
                    "SELECT COALESCE(SUM(principal_minor - principal_repaid_minor + fee_minor"
                    " - fee_repaid_minor), 0) FROM loans WHERE msisdn = ? AND state IN (?, ?, ?)",
                    (msisdn, *store.LOAN_JOURNALLED_STATES),
                ).fetchone()[0]
                assert cached == debt, f"loan cache {cached} != journal {debt} for {msisdn}"
            return {
                "totals": store.account_totals(conn),
                "debts": dict(per_sub),
                # every granted loan, advances included, by credit_key
                "granted_sessions": {
                    credit_key(r[0], r[1]): r[2]
                    for r in conn.execute(
                        "SELECT diameter_session_id, request_number, principal_minor FROM loans"
                        " WHERE state IN ('ACTIVE', 'PARTIALLY_REPAID', 'REPAID', 'WRITTEN_OFF')"
                    )
                },
                "recovered": conn.execute(
                    "SELECT COALESCE(SUM(recovered_minor), 0) FROM recoveries WHERE state = 'DONE'"
                ).fetchone()[0],
            }

        return await self.ledger.read(gather)
