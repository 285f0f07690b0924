"""The unit-of-work port: how the services reach the ledger without knowing its database.

What this file owns: the operations the use cases need from storage, as two
protocols.

* `LedgerTx` — one transaction's view of the ledger: named operations (load a
  subscriber, insert a loan, settle it, book a recovery, record an idempotent outcome,
  record an ad, ...). Everything a service does with money inside one `LedgerTx` is
  committed or rolled back as a whole; an operation that breaks an invariant (an
  unbalanced journal entry, a second row for a unique key, a state change the saga
  table in `core/sagas.py` does not allow) raises and rolls the whole unit back.
* `UnitOfWork` — runs a plain (synchronous) function over a `LedgerTx`: `write(fn)`
  returns once the transaction is durable, `write_staged(fn)` once `fn` has run (with
  a future for the durability), `write_later(fn)` when the adapter likes (a future for
  the durability; nobody awaits it on a hot path), `read(fn)` / `read_point(fn)` see
  everything committed and must not write.

The functions are synchronous on purpose: a unit of work is a handful of indexed
statements and some Python, and a service never awaits anything (the IN, the SMSC)
while it holds a transaction. Network calls happen between units of work, under the
subscriber's lock.

Adapters:

* SQLite: `extrabalance.ledger.Ledger` is the runner, the group-commit writer as it
  is (WAL, `synchronous=FULL`, many units per COMMIT, each in its own savepoint, run
  on the event-loop thread); its `LedgerTx` is the ledger's own connection
  (`ledger/sqlite_uow.py`), so the port costs no extra object or call per operation.
* In memory (`extrabalance.ledger.memory`): the same operations and invariants over
  plain dicts, for the service tests; `tests/ledger/test_unit_of_work_contract.py` runs
  one set of tests against all three.
* PostgreSQL (`extrabalance.ledger.postgres`): psycopg 3 synchronous connections on a
  small thread pool, one transaction per `write(fn)` (no group commit: the database's
  own commit does the batching), `fn` running on the pool thread. The first operation
  of a write unit that names a subscriber (directly, or through a loan, recovery or
  request key of his) takes `SELECT ... FROM subscribers WHERE msisdn = %s FOR UPDATE`,
  which serialises one subscriber's units of work across nodes sharing the database the
  way `SubscriberLocks` serialises them inside one node. That is why a service calls
  the port's operations and never the SQL functions behind them with a connection:
  those take no lock. `write_staged` is `write` (the answer waits for the commit).

Nothing in this protocol assumes one process, one connection or the event-loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:  # row types only: the services never import the SQL modules
    from extrabalance.core.adjustments import AdjustmentResult
    from extrabalance.core.limits import LimitState
    from extrabalance.core.model import OpenLoan, SubscriberProfile
    from extrabalance.core.payback import Recovery
    from extrabalance.core.policy import Bundle
    from extrabalance.ledger.ads_store import AdSubscriberRow, AudienceRow, CampaignRow
    from extrabalance.ledger.outbox_store import OutboxRow
    from extrabalance.ledger.store import AuditRow, LoadedSubscriber, LoanRow, RecoveryRow

T = TypeVar("T")


class LedgerTx(Protocol):
    """One transaction's operations. Money is in minor units; `now` is the service's
    clock reading (adapters never read a clock for business timestamps)."""

    def ping(self) -> None:
        """Reach the database and come back (the node's readiness check)."""
        ...

    # -- subscribers ---------------------------------------------------------------
    def load_subscriber(
        self, msisdn: str, *, balance_minor: int | None = None, default_language: str = "en"
    ) -> LoadedSubscriber:
        """Everything `core.lending.decide` needs: profile, open loans, pending work."""
        ...

    def put_profile(self, profile: SubscriberProfile, now: datetime) -> None:
        """Create or replace the operator's profile of a subscriber (the daily CSV's
        row); his loans, preferences and bars are kept."""
        ...

    def open_loans(self, msisdn: str) -> tuple[OpenLoan, ...]: ...
    def debt_owed(self, msisdn: str) -> int: ...
    def learn_route(self, msisdn: str, in_node: str, now: datetime) -> None: ...
    def learned_route(self, msisdn: str) -> str | None: ...
    def set_preferences(
        self,
        msisdn: str,
        now: datetime,
        *,
        auto_advance: bool | None = None,
        ads_opt_out: bool | None = None,
        language: str | None = None,
    ) -> None: ...
    def limit_state(self, msisdn: str) -> LimitState:
        """What his limit from behaviour is computed from (`core.limits`); empty for a
        subscriber never seen."""
        ...

    def put_limit_state(self, msisdn: str, state: LimitState, now: datetime) -> None:
        """Keep his limit state; written in the unit of the recharge or payback that
        changed it."""
        ...

    def set_bar(
        self, msisdn: str, barred: bool, reason: str | None, who: str, now: datetime
    ) -> None:
        """Manual bar or unbar, with an audit line."""
        ...

    def audit(
        self,
        msisdn: str,
        action: str,
        who: str,
        why: str,
        now: datetime,
        detail: Mapping[str, Any] | None = None,
    ) -> None: ...

    def audit_trail(
        self, msisdn: str, actions: tuple[str, ...] = (), limit: int = 10_000
    ) -> list[AuditRow]:
        """His audit lines (only `actions` when given), oldest first, the newest `limit`."""
        ...

    def loan_times(self, msisdn: str, since: datetime) -> tuple[datetime, ...]:
        """When his loans that did not fail were taken, since `since`, oldest first."""
        ...

    # -- idempotency -----------------------------------------------------------------
    def idempotent_get(self, key: str) -> dict[str, Any] | None: ...
    def idempotent_put(self, key: str, outcome: Mapping[str, Any], now: datetime) -> None:
        """Record the first outcome for `key`; a later put keeps the first."""
        ...

    def idempotent_replace(self, key: str, outcome: Mapping[str, Any], now: datetime) -> None:
        """Overwrite a provisional outcome once the operation settled."""
        ...

    def purge_idempotency(self, before: datetime, limit: int) -> int: ...

    # -- loans and advances ----------------------------------------------------------
    def get_loan(self, loan_id: str) -> LoanRow | None: ...
    def loan_by_idempotency_key(self, key: str) -> LoanRow | None: ...
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
        """Book a loan in a state the saga table allows for a new record; ACTIVE and
        CONFIRMING are journalled at once. The idempotency key is unique. An adapter
        that knows its node leases the saga to it when `owner_node` is not given.
        `bundle`: a bundle loan's units, kept on the loan (`LoanRow.bundle`) so that
        every send of its credit, re-sends included, asks the IN for the same units
        whatever the tier says by then."""
        ...

    def settle_loan(
        self, loan_id: str, new_state: str, now: datetime, *, result_code: int | None = None
    ) -> LoanRow:
        """Settle a borrow (ACTIVE journals the disbursement). Same state: no change."""
        ...

    def settle_advance(
        self,
        loan_id: str,
        confirmed: bool,
        now: datetime,
        *,
        result_code: int | None = None,
        never_credited: bool = False,
    ) -> LoanRow:
        """Settle a CONFIRMING advance; refused reverses its journal entry.
        `never_credited` (reconciliation with the IN's own records): an ACTIVE advance
        with nothing recovered yet is reversed the same way."""
        ...

    def advances_of_in_node(self, in_node: str, until: datetime) -> list[LoanRow]:
        """Automatic advances granted to `in_node`'s requests up to `until`, oldest
        first (reconciliation with that IN's records; may scan)."""
        ...

    def record_session_evidence(
        self, loan_id: str, session_id: str, request_type: int, request_number: int,
        used_minor: int | None, now: datetime,
    ) -> bool:
        """The IN continued advance `loan_id`'s credit-control session (an UPDATE or
        TERMINATION after the granting INITIAL, RFC 4006 §5.2): it applied the grant.
        The first such request is kept; True if this call recorded it."""
        ...

    def session_evidence(self, loan_id: str) -> tuple[int, int, int | None] | None:
        """(request_type, request_number, used_minor) of that request, or None."""
        ...

    # -- answers granting an advance that could not be handed over (migration 0015) ----
    def mark_answer_undelivered(self, loan_id: str, now: datetime) -> bool:
        """A CCA granting advance `loan_id` could not be handed to a live connection:
        open (or restart) its mark, unless an answer was delivered or the mark was
        settled already. True if the mark is open after this call."""
        ...

    def mark_answer_delivered(self, loan_id: str, now: datetime) -> bool:
        """An answer granting `loan_id` was handed to a live connection: no mark opens
        for it any more. True if an open mark was cleared."""
        ...

    def restart_answer_hold(self, loan_id: str, now: datetime) -> bool:
        """A re-send is being answered with `loan_id`'s grant: an open mark's hold
        starts again at `now`. True if a mark was open."""
        ...

    def close_answer_mark(self, loan_id: str, now: datetime) -> bool:
        """The resolver settled `loan_id`'s open mark. True if it was open."""
        ...

    def answer_mark_open_since(self, loan_id: str) -> datetime | None:
        """When `loan_id`'s open mark was last set; None when none is open."""
        ...

    def undelivered_loan_ids(self, msisdn: str) -> frozenset[str]:
        """His advances with an open mark (a recharge takes nothing for them)."""
        ...

    def undelivered_due(self, before: datetime, limit: int) -> list[tuple[str, str]]:
        """(loan_id, msisdn) of the open marks set at or before `before`, oldest first."""
        ...

    def unsettled_loans(self, limit: int) -> list[LoanRow]: ...
    def note_resolve_attempt(
        self, table: str, key: str, review_after: int, now: datetime
    ) -> bool: ...

    def write_off_candidates(self, before: datetime, limit: int) -> list[tuple[str, str]]: ...
    def write_off(self, loan_id: str, who: str, now: datetime) -> int:
        """Write the rest of an open loan off (journal + audit); 0 when it is not open
        or the subscriber has a settlement in flight."""
        ...

    def count_overdue(self, created_before: datetime, created_since: datetime) -> int:
        """Open loans created in [created_since, created_before)."""
        ...

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
        """An operator's goodwill write-down of his debt (`core.adjustments`): one
        balanced journal entry, the loans' repaid columns, an `adjust` audit line.
        Raises `AdjustmentError` (nothing changed) when refused; the same `request_id`
        again answers the first result, replayed."""
        ...

    # -- recoveries ----------------------------------------------------------------------
    def get_recovery(self, recovery_id: str) -> RecoveryRow | None: ...
    def recovery_by_event(self, event_id: str) -> RecoveryRow | None: ...
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
        """Book a RECOVERING recovery (the recharge's `event_id` is unique); leased as
        `insert_loan`'s loan."""
        ...

    def start_recovery_attempt(
        self, recovery_id: str, session_id: str, requested_minor: int, now: datetime
    ) -> int: ...
    def note_recovery_attempt(
        self,
        recovery_id: str,
        outcome: str,
        result_code: int | None,
        attempt_no: int | None = None,
    ) -> None: ...
    def set_recovery_state(self, recovery_id: str, state: str, now: datetime) -> None: ...
    def apply_recovery(self, rec: RecoveryRow, allocation: Recovery, now: datetime) -> None:
        """Book a debit split over the open loans by `core.payback.split`."""
        ...

    def unsettled_recoveries(self, limit: int) -> list[RecoveryRow]: ...

    # -- leases on the sagas (several nodes on one ledger) -----------------------------
    def claim_unsettled_loans(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[LoanRow]:
        """The unsettled loans `owner` may settle, oldest first, at most `limit`,
        leased to him until `lease_until`: those without an owner, his own (renewed)
        and those whose lease ran out. Two nodes claiming at once never share a row."""
        ...

    def claim_unsettled_recoveries(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[RecoveryRow]:
        """As `claim_unsettled_loans`, for recoveries with a debit sent."""
        ...

    def saga_lease(self, table: str, key: str) -> tuple[str | None, str | None]:
        """(owner_node, lease_until) of a loan ("loans") or recovery ("recoveries")."""
        ...

    # -- journal -----------------------------------------------------------------------
    def debt_from_journal(self, msisdn: str) -> int: ...
    def account_totals(self) -> dict[str, int]: ...
    def journal_entries(self, msisdn: str) -> list[tuple[str, str, int]]:
        """(transaction id, account, amount) of the subscriber's journal lines, in
        the order written."""
        ...

    # -- advertisements ------------------------------------------------------------------
    def load_ad_subscriber(self, msisdn: str) -> AdSubscriberRow | None: ...
    def recent_ads(self, msisdn: str, since: datetime) -> list[tuple[datetime, str]]: ...
    def record_ad(
        self,
        msisdn: str,
        trigger: str,
        template: str,
        now: datetime,
        campaign_id: str | None = None,
    ) -> str: ...
    def prune_ads(self, before: datetime, limit: int) -> int: ...

    # -- the do-not-disturb list -----------------------------------------------------------
    def dnd_listed(self, msisdn: str) -> bool:
        """True when no advertisement may go to `msisdn`."""
        ...

    def dnd_add(self, msisdns: Iterable[str], source: str, who: str, now: datetime) -> int:
        """List MSISDNs; returns how many were new."""
        ...

    def dnd_remove(self, msisdn: str) -> bool: ...
    def dnd_page(self, after_msisdn: str, limit: int) -> list[tuple[str, str, str, str]]:
        """(msisdn, source, added_by, added_at) after `after_msisdn`, in MSISDN order."""
        ...

    # -- campaigns -----------------------------------------------------------------------
    def audience_chunk(self, after_msisdn: str, limit: int) -> list[AudienceRow]: ...
    def create_campaign(
        self, template: str, segment: str | None, created_by: str, now: datetime
    ) -> str: ...
    def add_recipients(self, campaign_id: str, msisdns: Iterable[str], now: datetime) -> int: ...
    def get_campaign(self, campaign_id: str) -> CampaignRow | None: ...
    def list_campaigns(self, limit: int = 50) -> list[CampaignRow]: ...
    def active_campaigns(self) -> list[CampaignRow]: ...
    def set_campaign_state(self, campaign_id: str, state: str, now: datetime) -> None: ...
    def pending_recipients(self, campaign_id: str, limit: int) -> list[str]: ...
    def claim_recipients(self, campaign_id: str, now: datetime, until: datetime,
                         limit: int) -> list[str]:
        """PENDING recipients nobody holds at `now` (MSISDN order, at most `limit`),
        taken for sending until `until`: another node's drainer skips them meanwhile."""
        ...

    def settle_recipient(
        self, campaign_id: str, msisdn: str, state: str, reason: str | None, now: datetime
    ) -> bool: ...

    # -- outbox (messages to subscribers, sent after the commit) ------------------------
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
        """Queue a message in this unit of work: it exists if and only if the money
        it reports was committed. Returns its outbox id."""
        ...

    def outbox_due(self, now: datetime, limit: int) -> list[OutboxRow]:
        """Unsent messages due at `now`, oldest first."""
        ...

    def outbox_claim_due(self, now: datetime, until: datetime, limit: int) -> list[OutboxRow]:
        """The unsent messages due at `now`, oldest first, taken for sending: not due
        again before `until` (another node's sender skips them meanwhile)."""
        ...

    def outbox_retry_later(self, outbox_id: str, at: datetime) -> None: ...
    def outbox_mark_sent(self, outbox_id: str, now: datetime) -> bool:
        """Mark sent (False if it was already)."""
        ...

    def outbox_prune(self, before: datetime, limit: int) -> int: ...


class UnitOfWork(Protocol):
    """Runs units of work over a `LedgerTx` (see the module docstring)."""

    async def write(self, fn: Callable[[LedgerTx], T]) -> T:
        """Run `fn(tx)` atomically; return its result once it is durable."""
        ...

    async def write_staged(self, fn: Callable[[LedgerTx], T]) -> tuple[T, asyncio.Future[T]]:
        """Run `fn(tx)` atomically; return its result once it has run, with a future
        that resolves when it is durable (or raises if it was rolled back)."""
        ...

    def write_later(self, fn: Callable[[LedgerTx], T]) -> asyncio.Future[T]:
        """Run `fn(tx)` atomically when it suits the adapter (SQLite: in the next group
        commit that runs anyway, at most a quarter of a second later); the future
        resolves once it is durable. For writes nobody waits on and nothing is ordered
        against (marking an SMS sent)."""
        ...

    async def read(self, fn: Callable[[LedgerTx], T]) -> T:
        """Run `fn(tx)` over everything committed; may scan; must not write."""
        ...

    async def read_point(self, fn: Callable[[LedgerTx], T]) -> T:
        """As `read`, for reads bounded by an index lookup (may run inline)."""
        ...
