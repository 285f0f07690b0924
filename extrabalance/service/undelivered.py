"""Advances whose granting answer could not be handed to the IN (docs/diameter.md "An
answer the node could not deliver").

To an IN without the opt-in confirmation extension the grant in the CCA is the credit:
the node books the advance when it answers. When the IN's connection is already closed
or closing as the answer is ready, asyncio drops the write without a word, the IN
never credits the subscriber, yet the ledger holds the debt. The Diameter transport
tells the Gy adapter, which tells this service:

* an answer granting an advance that was NOT handed to a live connection opens a mark
  on the advance (`mark_answer_undelivered`, durable, migration 0015);
* a later answer granting the same advance (the IN's re-send, replayed from the
  idempotency record on any node, or from a node's duplicate cache) that WAS handed to
  a live connection clears it for good;
* while a mark is open, a recharge takes nothing for that advance (`recovery.py`); the
  debt still counts against the ceiling;
* once a mark is older than the IN's hold (`in_nodes[].undelivered_advance_hold_s`,
  300 s by default: longer than any IN's failover window and the node's duplicate
  cache), the resolver reverses the advance as never credited, exactly as
  `reconcile-in --apply` does, and replaces its request's outcome with a refusal so a
  later re-send cannot grant it again.

A re-send answered with the grant from the idempotency record restarts the hold in the
same unit of work (`lending.out_of_balance`), and the reversal runs under the
subscriber's lock (on PostgreSQL, the subscriber row's lock across nodes), re-reading
the mark: a replay and the reversal cannot both win.

Only the certain case is handled: an answer that was written to a live transport
whose link died afterwards is in doubt (the IN may have read it) and stays with
`reconcile-in`, which compares the ledger with the IN's own records.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import structlog

from extrabalance.core import sagas
from extrabalance.service.lending import Clock, reverse_never_credited
from extrabalance.service.locks import SubscriberLocks
from extrabalance.service.ports import EventSink
from extrabalance.service.unit_of_work import LedgerTx, UnitOfWork

log = structlog.get_logger(__name__)

# How long an advance's answer may stay undelivered before the advance is reversed.
# Longer than an IN's failover window (its Tx timer and T-flag re-sends to the other
# nodes) and than the node's Diameter duplicate cache (120 s), which replays the grant
# without asking the ledger.
UNDELIVERED_ADVANCE_HOLD_S = 300.0
UNDELIVERED_BATCH_MAX = 1_000  # marks looked at per resolver pass
REVERSAL_REASON = "answer_undelivered"  # the `reason` of the advance_reversed EDR line


def request_key(session_id: str, request_number: int) -> str:
    """The out-of-balance request's idempotency key (as `lending.out_of_balance`)."""
    return f"ccr:{session_id}:{request_number}"


class UndeliveredAdvances:
    """Marks, clears and, after the hold, reverses advances whose answer never left."""

    def __init__(
        self,
        ledger: UnitOfWork,
        events: EventSink,
        clock: Clock,
        *,
        locks: SubscriberLocks,
        advance_confirmation_nodes: frozenset[str] = frozenset(),
        holds_s: Mapping[str, float] | None = None,
        default_hold_s: float = UNDELIVERED_ADVANCE_HOLD_S,
        batch_max: int = UNDELIVERED_BATCH_MAX,
    ) -> None:
        self.ledger = ledger
        self.events = events
        self.clock = clock
        self.locks = locks
        # An IN with the confirmation extension settles its advances by confirming them.
        self.advance_confirmation_nodes = advance_confirmation_nodes
        self.holds_s = dict(holds_s or {})
        self.default_hold_s = default_hold_s
        self.batch_max = batch_max
        self.stats = {"marked": 0, "cleared": 0, "reversed": 0, "left_for_review": 0}

    def hold_of(self, in_node: str | None) -> timedelta:
        return timedelta(seconds=self.holds_s.get(in_node or "", self.default_hold_s))

    async def answer_handed(self, session_id: str, request_number: int, msisdn: str,
                            delivered: bool) -> None:
        """An answer granting the advance of (`session_id`, `request_number`) was handed
        to a live connection (`delivered`) or could not be (its connection was closed
        or closing, or the answer was dropped)."""
        key = request_key(session_id, request_number)
        async with self.locks.hold(msisdn):
            now = self.clock()

            def note(tx: LedgerTx) -> str | None:
                loan = tx.loan_by_idempotency_key(key)
                if loan is None or loan.in_node in self.advance_confirmation_nodes:
                    return None
                if delivered:
                    return loan.loan_id if tx.mark_answer_delivered(loan.loan_id, now) else None
                if loan.state != sagas.ACTIVE:
                    return None  # reversed already, or never granted
                return loan.loan_id if tx.mark_answer_undelivered(loan.loan_id, now) else None

            loan_id = await self.ledger.write(note)
        if loan_id is None:
            return
        if delivered:
            self.stats["cleared"] += 1
            log.info("advance_answer_delivered", loan_id=loan_id, session_id=session_id,
                     request_number=request_number)
        else:
            self.stats["marked"] += 1
            log.warning("advance_answer_undelivered", loan_id=loan_id, session_id=session_id,
                        request_number=request_number)

    async def reverse_due(self) -> int:
        """Reverse the advances whose mark outlived their IN's hold; returns how many."""
        now = self.clock()
        shortest = min([self.default_hold_s, *self.holds_s.values()])
        due = await self.ledger.read(
            lambda tx: tx.undelivered_due(now - timedelta(seconds=shortest), self.batch_max))
        reversed_ = 0
        for loan_id, msisdn in due:
            try:
                reversed_ += await self._reverse(loan_id, msisdn)
            except Exception:  # one advance's failure does not stop the others
                log.exception("undelivered_advance_reversal_failed", loan_id=loan_id)
        return reversed_

    async def _reverse(self, loan_id: str, msisdn: str) -> int:
        async with self.locks.hold(msisdn):
            now = self.clock()

            def reverse(tx: LedgerTx) -> tuple[str, int, int, str | None, int] | None:
                since = tx.answer_mark_open_since(loan_id)  # re-read under the lock
                loan = tx.get_loan(loan_id)
                if since is None or loan is None:
                    return None  # delivered, or settled by another node meanwhile
                hold = self.hold_of(loan.in_node)
                if now - since < hold:
                    return None  # this IN's hold is longer, or a re-send restarted it
                if loan.state == sagas.FAILED:
                    tx.close_answer_mark(loan_id, now)  # reversed already (reconcile-in)
                    return None
                loaded = tx.load_subscriber(msisdn)
                if loaded.recovery_pending:
                    return None  # a debit in flight: the next pass looks again
                if (loan.state != sagas.ACTIVE or loan.principal_repaid_minor
                        or loan.fee_repaid_minor):
                    # Money was taken, or the loan moved on: not certain any more.
                    tx.close_answer_mark(loan_id, now)
                    tx.audit(msisdn, "review", "resolver",
                             f"advance {loan_id}: its answer never reached {loan.in_node}, "
                             f"but it is {loan.state} with "
                             f"{loan.principal_repaid_minor + loan.fee_repaid_minor} recovered;"
                             " left to reconcile-in", now)
                    return "review", loan.principal_minor, loan.fee_minor, loan.in_node, 0
                reverse_never_credited(
                    tx, loan_id, now, who="resolver",
                    why=f"advance {loan_id}: no answer granting it reached {loan.in_node} "
                        f"within {hold.total_seconds():g} s")
                return ("reversed", loan.principal_minor, loan.fee_minor, loan.in_node,
                        tx.debt_owed(msisdn))

            done = await self.ledger.write(reverse)
            if done is None:
                return 0
            kind, amount_minor, fee_minor, in_node, debt_minor = done
            if kind == "review":
                self.stats["left_for_review"] += 1
                self.events.emit("review", msisdn=msisdn, loan_id=loan_id,
                                 reason=REVERSAL_REASON)
                return 0
            self.stats["reversed"] += 1
            self.events.emit("advance_reversed", msisdn=msisdn, loan_id=loan_id,
                             amount_minor=amount_minor, fee_minor=fee_minor,
                             debt_after_minor=debt_minor, in_node=in_node,
                             reason=REVERSAL_REASON)
            log.warning("advance_reversed_answer_undelivered", loan_id=loan_id)
            return 1
