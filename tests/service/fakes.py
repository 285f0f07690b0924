"""In-memory fakes of the IN, the notifier and the event sink, plus a harness that
wires the services over a real (temporary) ledger."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from extrabalance.core import sagas
from extrabalance.core.journal import DEBT_ACCOUNTS
from extrabalance.core.model import SubscriberProfile
from extrabalance.core.policy import Policy
from extrabalance.ledger import Ledger
from extrabalance.ledger.memory import MemoryUnitOfWork
from extrabalance.ledger.store import LoanRow, RecoveryRow
from extrabalance.service.accounts import AccountService
from extrabalance.service.lending import LendingService
from extrabalance.service.locks import SubscriberLocks
from extrabalance.service.ports import InAction, InOperation, InOutcome, InResult, Notice
from extrabalance.service.recovery import PaybackService
from extrabalance.service.resolver import Resolver
from extrabalance.service.routing import Router, RouteRule
from extrabalance.service.undelivered import UndeliveredAdvances
from extrabalance.service.unit_of_work import LedgerTx, UnitOfWork
from tests.core.sample import NOW, POLICY
from tests.pg import fresh_schema


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
                return InResult(InOutcome.REFUSED, 4012, short_of_credit=True)
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


# The ledgers the service tests run on: the same cases, the same assertions.
BACKENDS = ("sqlite", "memory", "postgresql")


class Harness:
    """Services over a ledger with fake ports: a real (temporary) SQLite file by
    default, or the in-memory one, or a PostgreSQL schema of its own (`backend`).
    `restart()` drops every in-memory object and re-opens the same ledger, as after a
    crash (the in-memory ledger keeps what was committed, as a file would).

    The checks (`check_invariants`, `view`, `loans`) read every row: over SQL on
    SQLite and PostgreSQL, over the tables on the in-memory ledger, so they see what
    is stored rather than what the port says."""

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
        backend: str = "sqlite",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
        # advance_confirmation: IN_A and IN_B implement the confirmation extension
        # (the node confirms their advances; the fake IN keys grant and confirmation as one).
        self.advance_confirmation_nodes = (
            frozenset(r.in_node for r in ROUTES) if advance_confirmation else frozenset())
        self.review_after_attempts = review_after_attempts
        self.db_path = db_path
        self.backend = backend
        self.policy = policy
        self.fake_in = fake_in or FakeIn(confirmation_extension=advance_confirmation)
        self.notifier = FakeNotifier()
        self.events = ListEvents()
        self.clock = clock or Clock()
        self.batch_window_ms = batch_window_ms
        self._resources = contextlib.ExitStack()
        self._memory = MemoryUnitOfWork() if backend == "memory" else None
        self._pg_conninfo = (
            self._resources.enter_context(fresh_schema("eb_svc"))
            if backend == "postgresql" else None)
        self._open()

    def _new_ledger(self) -> Any:
        if self._memory is not None:
            return self._memory
        if self._pg_conninfo is not None:
            from extrabalance.ledger.postgres import PostgresLedger

            return PostgresLedger(self._pg_conninfo, pool_max=4)
        return Ledger(self.db_path, batch_window_ms=self.batch_window_ms)

    def _open(self) -> None:
        self.ledger: UnitOfWork | Any = self._new_ledger()
        self.locks = SubscriberLocks()
        self.router = Router(ROUTES)
        common = (self.ledger, self.fake_in, self.notifier, self.events, self.policy)
        self.lending = LendingService(
            *common, self.router, self.clock, locks=self.locks, confirm_retry_delays_s=(0.0, 0.0),
            advance_confirmation_nodes=self.advance_confirmation_nodes,
        )
        self.payback = PaybackService(*common, self.router, self.clock, locks=self.locks)
        self.undelivered = UndeliveredAdvances(
            self.ledger, self.events, self.clock, locks=self.locks,
            advance_confirmation_nodes=self.advance_confirmation_nodes,
        )
        self.resolver = Resolver(
            *common, self.clock, locks=self.locks, review_after_attempts=self.review_after_attempts,
            advance_confirmation_nodes=self.advance_confirmation_nodes,
            undelivered=self.undelivered,
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
        try:
            await self.lending.drain_sagas()
            self.lending.abandon_confirmations()
            await self.lending.drain_confirmations()
            await self.ledger.close()
        finally:
            self._resources.close()

    # -- set-up and checks -------------------------------------------------------

    async def add_profile(
        self, msisdn: str, tenure_days: int = 400, arpu_minor: int = 6000, **attributes: str | int
    ) -> None:
        now = self.clock()
        profile = SubscriberProfile(msisdn, tenure_days, arpu_minor, dict(attributes))
        await self.ledger.write(lambda tx: tx.put_profile(profile, now))

    async def learned_route(self, msisdn: str) -> str | None:
        return await self.ledger.read_point(lambda tx: tx.learned_route(msisdn))

    async def loans(self, msisdn: str | None = None) -> list[LoanRow]:
        """Every loan (of `msisdn`), oldest first."""
        if self._memory is not None:
            rows = list(self._memory.tables.loans.values())
        else:
            def read(tx: Any) -> list[LoanRow]:
                ids = tx.execute("SELECT loan_id FROM loans").fetchall()
                return [tx.get_loan(row[0]) for row in ids]

            rows = await self.ledger.read(read)
        return sorted((r for r in rows if msisdn in (None, r.msisdn)),
                      key=lambda r: (r.created_at, r.loan_id))

    async def recoveries(self) -> list[RecoveryRow]:
        if self._memory is not None:
            return list(self._memory.tables.recoveries.values())

        def read(tx: Any) -> list[RecoveryRow]:
            ids = tx.execute("SELECT recovery_id FROM recoveries").fetchall()
            return [tx.get_recovery(row[0]) for row in ids]

        return list(await self.ledger.read(read))

    async def recovery_attempts(self) -> list[tuple[int, int, str | None]]:
        """(attempt number, amount asked, outcome) of every debit attempt."""
        if self._memory is not None:
            return sorted((no, att[1], att[2])
                          for (_, no), att in self._memory.tables.attempts.items())
        rows = await self.ledger.read(lambda tx: tx.execute(
            "SELECT attempt_no, requested_minor, outcome FROM recovery_attempts").fetchall())
        return sorted((int(r[0]), int(r[1]), r[2]) for r in rows)

    async def audit(self, msisdn: str) -> list[dict[str, Any]]:
        """His audit lines, oldest first (action, who, why)."""
        if self._memory is not None:
            lines = [a for a in self._memory.tables.audit if a["msisdn"] == msisdn]
            return [{k: a[k] for k in ("action", "who", "why")} for a in lines]
        rows = await self.ledger.read(lambda tx: tx.execute(
            "SELECT action, who, why FROM audit WHERE msisdn = ? ORDER BY created_at, audit_id",
            (msisdn,)).fetchall())
        return [{"action": r[0], "who": r[1], "why": r[2]} for r in rows]

    async def journal_lines(self) -> list[tuple[str, str, str, int]]:
        """(transaction id, account, msisdn, amount) of every journal line."""
        if self._memory is not None:
            return [(ln.tx_id, ln.account, ln.msisdn, ln.amount_minor)
                    for ln in self._memory.tables.journal]
        rows = await self.ledger.read(lambda tx: tx.execute(
            "SELECT tx_id, account, msisdn, amount_minor FROM journal").fetchall())
        return [(r[0], r[1], r[2], int(r[3])) for r in rows]

    async def view(self, msisdn: str) -> dict[str, Any]:
        """One subscriber's story, as the checks read it: his loans (dicts, oldest
        first), audit lines (newest first), whether an operation is pending, his debt."""
        loaded = await self.ledger.read(lambda tx: tx.load_subscriber(msisdn))
        return {
            "loans": [dataclasses.asdict(loan) for loan in await self.loans(msisdn)],
            "audit": list(reversed(await self.audit(msisdn))),
            "operation_pending": loaded.state.operation_pending,
            "debt_minor": loaded.state.debt_minor,
        }

    async def check_invariants(self) -> dict[str, Any]:
        """The money invariants; returns figures for further assertions."""
        lines = await self.journal_lines()
        by_tx: dict[str, int] = {}
        debts: dict[str, int] = {}
        for tx_id, account, msisdn, amount_minor in lines:
            by_tx[tx_id] = by_tx.get(tx_id, 0) + amount_minor
            if account in DEBT_ACCOUNTS:
                debts[msisdn] = debts.get(msisdn, 0) + amount_minor
        unbalanced = sorted(tx_id for tx_id, total in by_tx.items() if total != 0)
        assert unbalanced == [], f"unbalanced transactions {unbalanced}"
        loans = await self.loans()
        for msisdn, debt in debts.items():
            assert debt >= 0, f"negative debt {msisdn} {debt}"
            cached = sum(
                ln.principal_minor - ln.principal_repaid_minor + ln.fee_minor
                - ln.fee_repaid_minor
                for ln in loans
                if ln.msisdn == msisdn and ln.state in sagas.LOAN_JOURNALLED_STATES
            )
            assert cached == debt, f"loan cache {cached} != journal {debt} for {msisdn}"

        def port_agrees(tx: LedgerTx) -> None:
            for msisdn, debt in debts.items():
                assert tx.debt_owed(msisdn) == tx.debt_from_journal(msisdn) == debt

        await self.ledger.read(port_agrees)
        granted = (sagas.ACTIVE, sagas.PARTIALLY_REPAID, sagas.REPAID, sagas.WRITTEN_OFF)
        return {
            "totals": await self.ledger.read(lambda tx: tx.account_totals()),
            "debts": debts,
            # every granted loan, advances included, by credit_key
            "granted_sessions": {
                credit_key(ln.diameter_session_id or "", ln.request_number): ln.principal_minor
                for ln in loans if ln.state in granted
            },
            "recovered": sum(r.recovered_minor for r in await self.recoveries()
                             if r.state == sagas.DONE),
        }
