"""Reconcile the node's ledger against what the IN simulator applied, exactly.

What this file owns: the money checks shared by the end-to-end benchmark and the
chaos run. Input: the ledger file (read directly with sqlite3, the node stopped or
not) and the dumps of the simulator workers (bench/netsim.py `dump`). Output: counts
and a list of discrepancies; an empty list means the books agree to the minor unit.

The checks, each a class of lost or doubled money:
* every credit the IN applied (REFUND_ACCOUNT 2001, advance granted in a CCA) is one
  granted loan (ACTIVE, PARTIALLY_REPAID, REPAID, WRITTEN_OFF) with the same Session-Id,
  MSISDN and amount, and every granted loan is one such credit; a FAILED loan has no
  credit; no loan is left unsettled (CREDITING, UNKNOWN, CONFIRMING);
* every debit the IN applied (DIRECT_DEBITING 2001) belongs to an attempt of a DONE
  recovery, and each DONE recovery's recovered amount is the sum of its debits; no
  recovery is left unsettled;
* per subscriber: IN credits − debits = ledger lent − recovered; journal debt = lent +
  fees − recovered − written off; IN balance = initial + what moved − usage;
* the journal sums to zero, in total and per transaction;
* (chaos) every recharge event the broker acknowledged is accounted for exactly once
  (a recovery row or an idempotency record for its event_id), and the ledger knows no
  event the IN never made; no USSD dialog or SMS got more than one loan.
"""

from __future__ import annotations

import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extrabalance.diameter.constants import DIAMETER_SUCCESS

GRANTED_STATES = ("ACTIVE", "PARTIALLY_REPAID", "REPAID", "WRITTEN_OFF")
UNSETTLED_LOAN_STATES = ("REQUESTED", "CREDITING", "UNKNOWN", "CONFIRMING")
UNSETTLED_RECOVERY_STATES = ("RECOVERING", "UNKNOWN")
CREDIT_ACTIONS = ("REFUND_ACCOUNT", "OUT_OF_BALANCE_GRANT")
BROKER_LOSS_WINDOW_S = 3.0  # a broker SIGKILL may lose what it acknowledged this recently
DETAILS_MAX = 20  # discrepancies listed per kind; beyond that only counted


@dataclass
class Reconciliation:
    loans_granted: int = 0
    loans_failed: int = 0
    recoveries_done: int = 0
    in_credits: int = 0
    in_debits: int = 0
    lent_minor: int = 0
    recovered_minor: int = 0
    in_credited_minor: int = 0
    in_debited_minor: int = 0
    journal_sum_minor: int = 0
    subscribers_checked: int = 0
    recharges_checked: int = 0
    counts: Counter[str] = field(default_factory=Counter)  # discrepancy kind -> count
    details: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # facts, not discrepancies

    def flag(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        listed = self.details.setdefault(kind, [])
        if len(listed) < DETAILS_MAX:
            listed.append(detail)

    @property
    def discrepancies(self) -> int:
        return sum(self.counts.values())

    @property
    def matches(self) -> bool:
        return self.discrepancies == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "matches": self.matches,
            "discrepancies": self.discrepancies,
            "by_kind": dict(self.counts),
            "details": self.details,
            "notes": self.notes,
            "loans_granted": self.loans_granted,
            "loans_failed": self.loans_failed,
            "recoveries_done": self.recoveries_done,
            "in_credits": self.in_credits,
            "in_debits": self.in_debits,
            "lent_minor": self.lent_minor,
            "recovered_minor": self.recovered_minor,
            "in_credited_minor": self.in_credited_minor,
            "in_debited_minor": self.in_debited_minor,
            "journal_sum_minor": self.journal_sum_minor,
            "subscribers_checked": self.subscribers_checked,
            "recharges_checked": self.recharges_checked,
        }


def reconcile(
    ledger_path: str | Path,
    in_dump: dict[str, Any],
    smsc_dump: dict[str, Any] | None = None,
    *,
    check_recharges: bool = False,
    broker_kills_s: tuple[float, ...] = (),
) -> Reconciliation:
    """Compare the ledger with the IN's applied operations; see the module docstring."""
    r = Reconciliation()
    conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)
    try:
        _check(conn, r, in_dump, smsc_dump, check_recharges, broker_kills_s)
    finally:
        conn.close()
    return r


def _check(conn: sqlite3.Connection, r: Reconciliation, in_dump: dict[str, Any],
           smsc_dump: dict[str, Any] | None, check_recharges: bool,
           broker_kills_s: tuple[float, ...]) -> None:
    # -- what the IN applied ------------------------------------------------------------
    credits: dict[str, list[tuple[str, int]]] = defaultdict(list)  # sid -> [(msisdn, amount)]
    debits: dict[str, list[tuple[str, int]]] = defaultdict(list)
    in_credit_by_msisdn: Counter[str] = Counter()
    in_debit_by_msisdn: Counter[str] = Counter()
    moved_by_msisdn: Counter[str] = Counter()
    recharge_ids: set[str] = set()
    for node, sid, number, action, msisdn, amount, result, _after in in_dump["applied"]:
        del node, number
        if result != DIAMETER_SUCCESS:
            continue
        if action in CREDIT_ACTIONS:
            credits[sid].append((msisdn, amount))
            in_credit_by_msisdn[msisdn] += amount
            moved_by_msisdn[msisdn] += amount
        elif action == "DIRECT_DEBITING":
            debits[sid].append((msisdn, amount))
            in_debit_by_msisdn[msisdn] += amount
            moved_by_msisdn[msisdn] -= amount
        elif action == "RECHARGE":
            moved_by_msisdn[msisdn] += amount
            recharge_ids.add(sid)
    r.in_credits = sum(len(v) for v in credits.values())
    r.in_debits = sum(len(v) for v in debits.values())
    r.in_credited_minor = sum(in_credit_by_msisdn.values())
    r.in_debited_minor = sum(in_debit_by_msisdn.values())
    if in_dump.get("duplicate_mismatch"):
        r.flag("in_duplicate_key_other_content",
               f"{in_dump['duplicate_mismatch']} requests re-used a key with other content")
    taken_over = sum(int(stats.get("requests_from_another_node", 0))
                     for stats in (in_dump.get("stats") or {}).values())
    if taken_over:
        # Several nodes: a node finished an operation another node had left (stopped
        # or killed); the IN replayed its first answer (simulators/in_node.py).
        r.notes.append(f"{taken_over} requests came again from another node than the"
                       " first (operations taken over from a stopped node)")
    for kind, count in sorted((in_dump.get("nonstandard") or {}).items()):
        # What the strict IN counted outside RFC 6733 / RFC 4006 (simulators/in_node.py).
        if not count:
            continue
        if kind == "nonstandard_t_flag_on_first_request":
            # Not a fault by itself: a request lost with a dropped connection, or sent
            # again after a node restart that cannot know whether it left, is a possible
            # duplicate (RFC 6733 §5.5.4) although this IN never saw its first copy.
            r.notes.append(f"{count} T-flagged requests were the first copy the IN saw"
                           " (lost connections, node restarts)")
            continue
        r.flag(kind, f"{count} requests")

    # -- loans -----------------------------------------------------------------------------
    lent_by_msisdn: Counter[str] = Counter()
    owed_by_msisdn: Counter[str] = Counter()  # principal + fee of granted loans
    matched_credit_sids: set[str] = set()
    loans_by_channel: dict[str, Counter[str]] = defaultdict(Counter)
    for loan_id, msisdn, principal, fee, state, channel, sid in conn.execute(
        "SELECT loan_id, msisdn, principal_minor, fee_minor, state, channel,"
        " diameter_session_id FROM loans"
    ):
        loans_by_channel[channel][msisdn] += 1
        applied = credits.get(sid or "", [])
        if state in GRANTED_STATES:
            r.loans_granted += 1
            r.lent_minor += principal
            lent_by_msisdn[msisdn] += principal
            owed_by_msisdn[msisdn] += principal + fee
            if not applied:
                r.flag("loan_without_in_credit", f"loan {loan_id} {msisdn} {principal} sid={sid}")
            elif len(applied) > 1:
                r.flag("in_credit_doubled", f"loan {loan_id} sid={sid} credited {len(applied)}x")
            elif applied[0] != (msisdn, principal):
                r.flag("credit_differs", f"loan {loan_id} {msisdn} {principal} vs IN {applied[0]}")
            matched_credit_sids.add(sid or "")
        elif state == "FAILED":
            r.loans_failed += 1
            if applied:
                r.flag("in_credit_on_failed_loan", f"loan {loan_id} {msisdn} sid={sid}")
                matched_credit_sids.add(sid or "")
        elif state in UNSETTLED_LOAN_STATES:
            r.flag("loan_unsettled", f"loan {loan_id} {msisdn} {state}")
            matched_credit_sids.add(sid or "")  # reported once, as unsettled
    for sid, applied in credits.items():
        if sid not in matched_credit_sids:
            r.flag("in_credit_without_loan", f"sid={sid} {applied}")

    # -- recoveries ------------------------------------------------------------------------
    attempt_of: dict[str, str] = {}
    for recovery_id, sid in conn.execute(
        "SELECT recovery_id, diameter_session_id FROM recovery_attempts"
    ):
        attempt_of[sid] = recovery_id
    debited_by_recovery: Counter[str] = Counter()
    for sid, applied in debits.items():
        recovery_id = attempt_of.get(sid)
        if recovery_id is None:
            r.flag("in_debit_without_recovery", f"sid={sid} {applied}")
            continue
        if len(applied) > 1:
            r.flag("in_debit_doubled", f"sid={sid} debited {len(applied)}x")
        debited_by_recovery[recovery_id] += sum(a for _, a in applied)
    recovered_by_msisdn: Counter[str] = Counter()
    ledger_event_ids: Counter[str] = Counter()
    for recovery_id, msisdn, event_id, recovered, state in conn.execute(
        "SELECT recovery_id, msisdn, event_id, recovered_minor, state FROM recoveries"
    ):
        ledger_event_ids[event_id] += 1
        debited = debited_by_recovery.get(recovery_id, 0)
        if state == "DONE":
            r.recoveries_done += 1
            r.recovered_minor += recovered
            recovered_by_msisdn[msisdn] += recovered
            if debited != recovered:
                r.flag("recovery_differs_from_in",
                       f"recovery {recovery_id} {msisdn}: ledger {recovered}, IN {debited}")
        elif state in UNSETTLED_RECOVERY_STATES:
            r.flag("recovery_unsettled", f"recovery {recovery_id} {msisdn} {state}")
        elif debited:
            r.flag("in_debit_on_unrecovered", f"recovery {recovery_id} {state}: IN took {debited}")

    # -- per subscriber --------------------------------------------------------------------
    journal_debt: Counter[str] = Counter()
    written_off: Counter[str] = Counter()
    for msisdn, account, amount in conn.execute(
        "SELECT msisdn, account, SUM(amount_minor) FROM journal GROUP BY msisdn, account"
    ):
        if account in ("principal_receivable", "fee_receivable"):
            journal_debt[msisdn] += int(amount)
        elif account == "written_off":
            written_off[msisdn] += int(amount)
    subscribers = set(lent_by_msisdn) | set(in_credit_by_msisdn) | set(in_debit_by_msisdn) \
        | set(journal_debt) | set(recovered_by_msisdn)
    for msisdn in sorted(subscribers):
        r.subscribers_checked += 1
        in_net = in_credit_by_msisdn[msisdn] - in_debit_by_msisdn[msisdn]
        ledger_net = lent_by_msisdn[msisdn] - recovered_by_msisdn[msisdn]
        if in_net != ledger_net:
            r.flag("subscriber_net_differs",
                   f"{msisdn}: IN credits-debits {in_net}, ledger lent-recovered {ledger_net}")
        expected_debt = owed_by_msisdn[msisdn] - recovered_by_msisdn[msisdn] \
            - written_off[msisdn]
        if journal_debt[msisdn] != expected_debt:
            r.flag("subscriber_debt_differs",
                   f"{msisdn}: journal {journal_debt[msisdn]}, loans-recoveries {expected_debt}")
        if journal_debt[msisdn] < 0:
            r.flag("negative_debt", f"{msisdn}: {journal_debt[msisdn]}")
    initial = int(in_dump.get("initial_balance_minor", 0))
    spent = in_dump.get("spent_minor", {})
    for msisdn, balance in in_dump.get("balances", {}).items():
        expected = initial + moved_by_msisdn[msisdn] - int(spent.get(msisdn, 0))
        if balance != expected:
            r.flag("in_balance_differs", f"{msisdn}: IN {balance}, applied ops say {expected}")

    # -- journal -----------------------------------------------------------------------------
    r.journal_sum_minor = int(conn.execute(
        "SELECT COALESCE(SUM(amount_minor), 0) FROM journal").fetchone()[0])
    if r.journal_sum_minor != 0:
        r.flag("journal_unbalanced", f"journal sums to {r.journal_sum_minor}")
    for (tx_id,) in conn.execute(
        "SELECT tx_id FROM journal GROUP BY tx_id HAVING SUM(amount_minor) != 0"
    ):
        r.flag("journal_tx_unbalanced", f"tx {tx_id}")

    # -- idempotency -------------------------------------------------------------------------
    for key, n in conn.execute(
        "SELECT idempotency_key, COUNT(*) FROM loans WHERE idempotency_key IS NOT NULL"
        " GROUP BY idempotency_key HAVING COUNT(*) > 1"
    ):
        r.flag("loan_key_twice", f"{key}: {n} loans")
    if smsc_dump is not None:
        dials = smsc_dump.get("dials", {})
        for msisdn, n in loans_by_channel.get("ussd", {}).items():
            if n > int(dials.get(msisdn, 0)):
                r.flag("ussd_loans_exceed_dialogs", f"{msisdn}: {n} loans, {dials.get(msisdn, 0)}")
        sms = smsc_dump.get("mo_sms", {})
        for msisdn, n in loans_by_channel.get("sms", {}).items():
            if n > int(sms.get(msisdn, 0)):
                r.flag("sms_loans_exceed_sms", f"{msisdn}: {n} loans, {sms.get(msisdn, 0)} SMS")

    if check_recharges:
        idem = {row[0][len("recharge:"):] for row in conn.execute(
            "SELECT key FROM idempotency WHERE key LIKE 'recharge:%'")}
        published = in_dump.get("published_event_ids", [])
        unconfirmed = set(in_dump.get("unconfirmed_event_ids", []))
        acked_at = in_dump.get("published_at_s", {})
        lost_by_broker = 0
        for event_id in published:
            r.recharges_checked += 1
            if ledger_event_ids.get(event_id, 0) == 0 and event_id not in idem:
                at = acked_at.get(event_id)
                if at is not None and any(0 <= k - at <= BROKER_LOSS_WINDOW_S
                                          for k in broker_kills_s):
                    # Mosquitto acknowledged it, then was SIGKILLed before its next
                    # autosave: the broker lost it, the node never saw it.
                    lost_by_broker += 1
                    continue
                r.flag("recharge_not_accounted", event_id)
        if broker_kills_s:
            r.notes.append(f"{lost_by_broker} acknowledged recharges lost by a broker SIGKILL "
                           f"within {BROKER_LOSS_WINDOW_S} s of their PUBACK (not node faults)")
        for event_id, n in ledger_event_ids.items():
            if n > 1:
                r.flag("recharge_accounted_twice", f"{event_id}: {n} recoveries")
        for event_id in set(ledger_event_ids) | idem:
            if event_id not in recharge_ids:
                r.flag("recharge_unknown_to_in", event_id)
        r.notes.append(
            f"{len(unconfirmed)} recharges without PUBACK (published or not: only at most once "
            f"is required of them); {sum(1 for e in unconfirmed if e in idem or e in ledger_event_ids)}"
            " of them reached the node")


def settle_advances_with_in(ledger_path: str | Path, in_dump: dict[str, Any]) -> dict[str, int]:
    """What an operator does with an IN built to RFC 4006 alone (`extrabalance
    reconcile-in`, docs/operations.md): check the ledger's automatic advances against
    the IN's own record of the grants it applied, and reverse those it never applied
    (every answer reached it too late, or the node died before writing it). Run with
    the node stopped; returns {IN Origin-Host: advances reversed}."""
    from extrabalance.clock import SYSTEM_CLOCK
    from extrabalance.ledger.db import connect
    from extrabalance.ledger.store import ts
    from extrabalance.service.reconcile_in import InGrant, reconcile_in

    grants = [InGrant(sid, number, msisdn, amount)
              for _node, sid, number, action, msisdn, amount, result, _after in in_dump["applied"]
              if action == "OUT_OF_BALANCE_GRANT" and result == DIAMETER_SUCCESS]
    now = SYSTEM_CLOCK.now()
    reversed_by_node: dict[str, int] = {}
    conn = connect(Path(ledger_path))
    try:
        hosts = [row[0] for row in conn.execute(
            "SELECT DISTINCT in_node FROM loans WHERE channel = 'auto' AND created_at <= ?",
            (ts(now),)) if row[0]]
        for host in hosts:
            own = [g for g in grants if g.session_id.startswith(host + ";")]
            conn.execute("BEGIN IMMEDIATE")
            try:
                report = reconcile_in(conn, own, in_node=host, until=now, apply=True, now=now)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            reversed_by_node[host] = len(report.reversed)
    finally:
        conn.close()
    return reversed_by_node
