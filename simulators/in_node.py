"""The prepaid IN / OCS simulator: several IN nodes in one process, over real Diameter.

What this file owns
-------------------
* The account book of each simulated IN node (`InAccounts`): balances per subscriber,
  the MSISDN ranges the node serves, the table of first answers that makes every
  operation exactly-once, and the ledger of applied operations that tests reconcile
  against the node's own ledger.
* The fault model (`InFaults`, `plan_faults`): answer delay, answers dropped after
  the operation was applied, forced 3002 / 3004 (not applied) and 4010 / 4012 / 5030
  answers for a share of requests or for given MSISDNs, silent watchdog, disconnects.
* The Diameter glue (`InSimulator`): one `DiameterNode` per IN node, each with its own
  Origin-Host and listening port, serving docs/protocols.md "Node → IN" and sending
  docs/protocols.md "IN → node" out-of-balance requests as a client; recharges published
  on MQTT through `simulators.recharge_publisher`.
* Several Extra Balance nodes (docs/scale-out.md): given more than one node peer, each
  IN node dials every one of them, spreads its out-of-balance CCRs over the open
  connections (round robin, realm-routed: no Destination-Host, RFC 6733 §6.1) and,
  when a node's connection goes away with requests pending, re-sends them to another
  node with the T flag and the same End-to-End id (RFC 6733 §5.5.4).
* The `extrabalance sim in` entry point (`main_in`).

Exactly-once, as the node relies on it
--------------------------------------
The key of an operation is (Session-Id, CC-Request-Number). The first request with a
key is executed and its answer stored; every later request with that key, with or
without the T flag, gets the stored answer and changes nothing. Two answers are
deliberately NOT stored: 3002 UNABLE_TO_DELIVER and 3004 TOO_BUSY say "not executed",
and the node re-sends the same key without the T flag expecting it to be executed
then (RFC 6733 §7.1.3, docs/protocols.md). A dropped answer IS stored: the operation was
applied and only the answer was lost, the case that makes retries dangerous.

Strict by default: RFC 6733 / RFC 4006 and nothing private
-----------------------------------------------------------
An advance the node grants in a CCA (2001 + Granted-Service-Unit to our out-of-balance
CCR) is credited once per (Session-Id, CC-Request-Number) of our CCR, and that is all:
a REFUND_ACCOUNT from the node is a credit of its own, whatever Session-Id it
carries. A CCA that arrives after our Tx timer is discarded, as a real IN does; we
then re-send the same CCR once with the T flag and the same End-to-End id (RFC 6733
§5.5.4), and apply the grant of its answer. What the node does outside the
standards is counted per IN node (`nonstandard_*` stats): a REFUND_ACCOUNT carrying
one of our own out-of-balance Session-Ids (the confirmation extension), a T flag on
a request whose key we never received, a re-send of a key under another End-to-End
id by the same Origin-Host (another node of the realm sending the key uses its own
ids, RFC 6733 §3). A strict test asserts they stay zero.

`reject_nonstandard=True` (`--reject-nonstandard`) refuses instead of only counting:
a re-send of a key under another End-to-End id and a REFUND_ACCOUNT under one of our
own Session-Ids are answered 5012 DIAMETER_UNABLE_TO_COMPLY (CCA grammar, with an
Error-Message saying which rule) and neither executed nor stored, so a node that
relies on either sees a refusal rather than a silent second credit. A T flag on the
first copy of a key is still only counted: an IN cannot tell it from a re-send whose
first copy was lost (RFC 6733 §5.5.4), and processes it.

`advance_confirmation=True` (opt-in, docs/diameter.md "Advance confirmation
extension"): the IN that the extension describes. The CCA's grant is an operation
of the answer table under our CCR's key (recorded as a REFUND_ACCOUNT 2001) and
applied only if the key is free, so the node's confirmation under that key is a
duplicate, or the credit when the CCA never arrived.

The pure part (ranges, accounts, faults) does no IO and is tested without sockets;
the simulator never imports the node's application, domain or ledger code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import itertools
import json
import random
import signal
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from extrabalance.argparsing import Parser
from extrabalance.clock import SYSTEM_CLOCK
from extrabalance.diameter import codec, gy
from extrabalance.diameter.codec import Message
from extrabalance.diameter.constants import (  # the AVPs it checks, the Result-Codes it answers with
    AVP_CC_REQUEST_TYPE,
    AVP_REQUESTED_ACTION,
    AVP_REQUESTED_SERVICE_UNIT,
    DIAMETER_CREDIT_LIMIT_REACHED,
    DIAMETER_END_USER_SERVICE_DENIED,
    DIAMETER_SUCCESS,
    DIAMETER_TOO_BUSY,
    DIAMETER_UNABLE_TO_COMPLY,
    DIAMETER_UNABLE_TO_DELIVER,
    DIAMETER_USER_UNKNOWN,
)
from extrabalance.diameter.peer import DuplicateCache

if TYPE_CHECKING:
    from extrabalance.recharge.events import RechargeEvent


# Answers that mean "not executed, re-send later": never stored as the first answer.
NOT_EXECUTED_RESULTS = frozenset({DIAMETER_UNABLE_TO_DELIVER, DIAMETER_TOO_BUSY})
# Results a fault may force; anything else is refused at configuration time.
FORCEABLE_RESULTS = frozenset(
    {
        DIAMETER_UNABLE_TO_DELIVER,
        DIAMETER_TOO_BUSY,
        DIAMETER_END_USER_SERVICE_DENIED,
        DIAMETER_CREDIT_LIMIT_REACHED,
        DIAMETER_USER_UNKNOWN,
    }
)

# Bounds (TigerStyle: every table is bounded, and the bound has a name).
OOB_RESENDS_MAX = 1  # re-sends of an out-of-balance CCR whose answer did not come in time
ANSWERS_MAX = 1_000_000  # first answers remembered per IN node for duplicate detection
APPLIED_MAX = 1_000_000  # entries of the applied-operations ledger kept per simulator
AMOUNT_MAX_MINOR = 10**12  # one operation never moves more than this (same as recharge)


class Action(enum.IntEnum):
    """Requested-Action (436), RFC 4006 §8.41."""

    DIRECT_DEBITING = 0
    REFUND_ACCOUNT = 1
    CHECK_BALANCE = 2
    PRICE_ENQUIRY = 3


class CheckBalanceResult(enum.IntEnum):
    """Check-Balance-Result (422), RFC 4006 §8.6."""

    ENOUGH_CREDIT = 0
    NO_CREDIT = 1


CMD_CREDIT_CONTROL = 272

# Kinds of entries in the applied ledger besides the three Requested-Actions.
KIND_OUT_OF_BALANCE_GRANT = "OUT_OF_BALANCE_GRANT"  # the node granted an advance in a CCA
KIND_RECHARGE = "RECHARGE"  # a top-up made on this IN (published on MQTT)


# --- MSISDN ranges ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MsisdnRange:
    """Either a prefix (`prefix="20105"`) or an inclusive range of equal-length numbers."""

    start: str = ""
    end: str = ""
    prefix: str = ""

    def __post_init__(self) -> None:
        if self.prefix:
            if self.start or self.end:
                raise ValueError("an MSISDN range is a prefix or a start/end pair, not both")
            if not self.prefix.isascii() or not self.prefix.isdigit():
                raise ValueError(f"MSISDN prefix must be digits: {self.prefix!r}")
            return
        for value in (self.start, self.end):
            if not value.isascii() or not value.isdigit():
                raise ValueError(f"MSISDN range bound must be digits: {value!r}")
        if len(self.start) != len(self.end):
            raise ValueError(f"range bounds differ in length: {self.start}-{self.end}")
        if self.start > self.end:
            raise ValueError(f"range start after end: {self.start}-{self.end}")

    def __contains__(self, msisdn: object) -> bool:
        if not isinstance(msisdn, str):
            return False
        if self.prefix:
            return msisdn.startswith(self.prefix)
        return len(msisdn) == len(self.start) and self.start <= msisdn <= self.end

    @classmethod
    def parse(cls, text: str) -> MsisdnRange:
        """`201000000000-201049999999` (inclusive range) or `20105` / `20105*` (prefix)."""
        text = text.strip()
        if "-" in text:
            start, _, end = text.partition("-")
            return cls(start=start.strip(), end=end.strip())
        return cls(prefix=text.rstrip("*"))

    def sample(self, rng: random.Random, length: int = 12) -> str:
        """A random MSISDN inside the range (prefix ranges are padded to `length`)."""
        if self.prefix:
            pad = max(0, length - len(self.prefix))
            return self.prefix + "".join(rng.choice("0123456789") for _ in range(pad))
        return str(rng.randint(int(self.start), int(self.end))).zfill(len(self.start))

    def __str__(self) -> str:
        return f"{self.prefix}*" if self.prefix else f"{self.start}-{self.end}"


@dataclass(frozen=True, slots=True)
class InNodeSpec:
    """One simulated IN node: its Diameter identity, where it listens, whom it serves."""

    name: str
    origin_host: str
    realm: str
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (see InSimulator.ports())
    ranges: tuple[MsisdnRange, ...] = ()

    def owns(self, msisdn: str) -> bool:
        return any(msisdn in r for r in self.ranges)


# --- Operations and the account book -------------------------------------------------


@dataclass(frozen=True, slots=True)
class BalanceOp:
    """One node → IN request, as far as the account book cares."""

    session_id: str
    request_number: int
    action: Action
    msisdn: str
    amount_minor: int
    # A bundle credit (REFUND_ACCOUNT with an MSCC in units, not money): what to add
    # to the subscriber's bucket of that kind; amount_minor is then 0.
    bundle: Any = None  # gy.BundleUnits


@dataclass(frozen=True, slots=True)
class OpAnswer:
    result_code: int
    granted_minor: int | None = None  # DIRECT_DEBITING: what was debited
    check_balance_result: CheckBalanceResult | None = None
    granted_units: Any = None  # a bundle credited: gy.BundleUnits


@dataclass(frozen=True, slots=True)
class AppliedOp:
    """One entry of the ledger: an operation that got a final answer on an IN node."""

    node: str  # IN node name
    session_id: str  # Diameter Session-Id, or the recharge event_id
    request_number: int
    action: str  # Action name, KIND_OUT_OF_BALANCE_GRANT or KIND_RECHARGE
    msisdn: str
    amount_minor: int  # requested (or granted, for grants and recharges)
    result_code: int
    balance_after_minor: int
    bundle_kind: str = ""  # a bundle credit: "data", "voice" or "sms" ...
    units: int = 0  # ... and how many units (octets, seconds, SMS) it added

    @property
    def moved_minor(self) -> int:
        """Signed change of the subscriber's balance caused by this entry."""
        if self.result_code != DIAMETER_SUCCESS:
            return 0
        if self.action == Action.DIRECT_DEBITING.name:
            return -self.amount_minor
        if self.action == Action.CHECK_BALANCE.name:
            return 0
        return self.amount_minor


class InAccounts:
    """The book of one IN node: balances, first answers, and what was applied.

    Pure and synchronous: the asyncio glue calls `execute` once per request and never
    awaits in between, so two requests for one subscriber cannot interleave.
    """

    def __init__(
        self,
        spec: InNodeSpec,
        *,
        initial_balance_minor: int = 0,
        answers_max: int = ANSWERS_MAX,
        ledger: deque[AppliedOp] | None = None,
        confirmation_extension: bool = False,
    ) -> None:
        if answers_max < 1:
            raise ValueError("answers_max must be positive")
        self.spec = spec
        self.confirmation_extension = confirmation_extension
        # Strict mode: the keys of our own out-of-balance CCRs whose grant was applied
        # (bounded like the answers).
        self._grants: OrderedDict[tuple[str, int], int] = OrderedDict()
        self.initial_balance_minor = initial_balance_minor
        self._answers_max = answers_max
        self._balances: dict[str, int] = {}
        # Bundle buckets per subscriber: (kind, Rating-Group, Service-Identifier) → units
        self._buckets: dict[str, dict[tuple[str, int | None, int | None], int]] = {}
        self._answers: OrderedDict[tuple[str, int], tuple[BalanceOp, OpAnswer]] = OrderedDict()
        self._ledger: deque[AppliedOp] = ledger if ledger is not None else deque(maxlen=APPLIED_MAX)
        self.stats: dict[str, int] = {
            "executed": 0,
            "duplicates": 0,
            "duplicate_mismatch": 0,  # same key, different content: a bug in the client
            "answers_evicted": 0,
            # a REFUND_ACCOUNT under one of our own out-of-balance Session-Ids: a
            # private confirmation rule, a second credit at an RFC-only IN
            "nonstandard_refund_own_session": 0,
        }

    # -- balances --------------------------------------------------------------------

    def owns(self, msisdn: str) -> bool:
        return self.spec.owns(msisdn)

    def balance(self, msisdn: str) -> int:
        return self._balances.get(msisdn, self.initial_balance_minor)

    def set_balance(self, msisdn: str, amount_minor: int) -> None:
        _check_amount(amount_minor, allow_zero=True)
        self._balances[msisdn] = amount_minor

    def balances(self) -> dict[str, int]:
        return dict(self._balances)

    def buckets(self, msisdn: str) -> dict[str, int]:
        """His bundle buckets, units by kind ("data" octets, "voice" seconds, "sms")."""
        out: dict[str, int] = {}
        for (kind, _rg, _si), units in self._buckets.get(msisdn, {}).items():
            out[kind] = out.get(kind, 0) + units
        return out

    def applied(self) -> list[AppliedOp]:
        """The ledger entries (shared with the other nodes when a ledger was passed in)."""
        return list(self._ledger)

    def add(self, msisdn: str, amount_minor: int, *, kind: str, ref: str) -> int:
        """Credit `amount_minor` outside any node request (recharge, granted advance).

        Returns the balance after. Recorded in the ledger under `kind` with `ref` as id.
        """
        _check_amount(amount_minor, allow_zero=False)
        after = self.balance(msisdn) + amount_minor
        self._balances[msisdn] = after
        self._record(ref, 0, kind, msisdn, amount_minor, DIAMETER_SUCCESS)
        return after

    def spend(self, msisdn: str, amount_minor: int) -> int:
        """Usage (calls, data) eating the balance, never below zero; returns what was spent."""
        _check_amount(amount_minor, allow_zero=True)
        spent = min(self.balance(msisdn), amount_minor)
        self._balances[msisdn] = self.balance(msisdn) - spent
        return spent

    # -- node requests ---------------------------------------------------------------

    def apply_grant(
        self, session_id: str, request_number: int, msisdn: str, amount_minor: int
    ) -> bool:
        """Credit an advance the node granted in the CCA to our out-of-balance CCR.

        Exactly once per (Session-Id, CC-Request-Number) of our CCR. With the
        confirmation extension that key is shared with the node's requests: if it was
        executed already (the node's confirmation came first, or refused it) nothing
        is applied; otherwise the grant is remembered as a REFUND_ACCOUNT 2001, so the
        node's confirmation gets 2001 and applies nothing new. Returns True if
        credited now.
        """
        _check_amount(amount_minor, allow_zero=False)
        key = (session_id, request_number)
        if key in self._grants or (self.confirmation_extension and key in self._answers):
            self.stats["grant_duplicates"] = self.stats.get("grant_duplicates", 0) + 1
            return False
        self._grants[key] = amount_minor
        if len(self._grants) > self._answers_max:
            self._grants.popitem(last=False)
        self._balances[msisdn] = self.balance(msisdn) + amount_minor
        if self.confirmation_extension:
            op = BalanceOp(session_id, request_number, Action.REFUND_ACCOUNT, msisdn,
                           amount_minor)
            self._remember(key, op, OpAnswer(DIAMETER_SUCCESS))
        self._record(
            session_id, request_number, KIND_OUT_OF_BALANCE_GRANT, msisdn, amount_minor,
            DIAMETER_SUCCESS,
        )
        return True

    def own_session_refund(self, op: BalanceOp) -> bool:
        """A REFUND_ACCOUNT under one of our own out-of-balance Session-Ids (the
        confirmation extension), from a node when this IN does not implement it. Our
        own Session-Ids begin with our Origin-Host (RFC 6733 §8.8)."""
        return (op.action is Action.REFUND_ACCOUNT and not self.confirmation_extension
                and op.session_id.startswith(self.spec.origin_host + ";"))

    def first_answer(self, session_id: str, request_number: int) -> OpAnswer | None:
        entry = self._answers.get((session_id, request_number))
        return entry[1] if entry is not None else None

    def execute(self, op: BalanceOp, *, forced_result: int | None = None) -> tuple[OpAnswer, bool]:
        """Run one request exactly once. Returns (answer, is_duplicate).

        A duplicate key gets the first answer and changes nothing. `forced_result`
        (a fault) replaces the real outcome: 3002/3004 are neither applied nor stored;
        4010/4012/5030 are not applied but stored as the first answer.
        """
        key = (op.session_id, op.request_number)
        first = self._answers.get(key)
        if first is not None:
            self.stats["duplicates"] += 1
            if first[0] != op:
                self.stats["duplicate_mismatch"] += 1
            return first[1], True
        if forced_result is not None and forced_result not in FORCEABLE_RESULTS:
            raise ValueError(f"result {forced_result} cannot be forced")
        if self.own_session_refund(op):
            self.stats["nonstandard_refund_own_session"] += 1
        if forced_result in NOT_EXECUTED_RESULTS:
            return OpAnswer(forced_result), False
        if forced_result is not None:
            answer = OpAnswer(forced_result)
        elif not self.owns(op.msisdn):
            answer = OpAnswer(DIAMETER_USER_UNKNOWN)
        else:
            answer = self._apply(op)
        self.stats["executed"] += 1
        self._remember(key, op, answer)
        self._record(
            op.session_id, op.request_number, op.action.name, op.msisdn, op.amount_minor,
            answer.result_code, op.bundle,
        )
        return answer, False

    def _apply(self, op: BalanceOp) -> OpAnswer:
        balance = self.balance(op.msisdn)
        if op.bundle is not None:  # only REFUND_ACCOUNT gets here (_balance_op)
            b = op.bundle
            mine = self._buckets.setdefault(op.msisdn, {})
            key = (b.kind, b.rating_group, b.service_identifier)
            mine[key] = mine.get(key, 0) + b.quantity
            return OpAnswer(DIAMETER_SUCCESS, granted_units=b)
        if op.action is Action.REFUND_ACCOUNT:
            self._balances[op.msisdn] = balance + op.amount_minor
            return OpAnswer(DIAMETER_SUCCESS)
        if op.action is Action.DIRECT_DEBITING:
            if balance < op.amount_minor:
                return OpAnswer(DIAMETER_CREDIT_LIMIT_REACHED)
            self._balances[op.msisdn] = balance - op.amount_minor
            return OpAnswer(DIAMETER_SUCCESS, granted_minor=op.amount_minor)
        if op.action is Action.CHECK_BALANCE:
            enough = balance >= op.amount_minor
            result = CheckBalanceResult.ENOUGH_CREDIT if enough else CheckBalanceResult.NO_CREDIT
            return OpAnswer(DIAMETER_SUCCESS, check_balance_result=result)
        # PRICE_ENQUIRY is not part of the contract: refuse without applying anything.
        return OpAnswer(DIAMETER_END_USER_SERVICE_DENIED)

    def _remember(self, key: tuple[str, int], op: BalanceOp, answer: OpAnswer) -> None:
        self._answers[key] = (op, answer)
        if len(self._answers) > self._answers_max:
            self._answers.popitem(last=False)
            self.stats["answers_evicted"] += 1

    def _record(
        self, ref: str, number: int, kind: str, msisdn: str, amount_minor: int, result: int,
        bundle: Any = None,
    ) -> None:
        self._ledger.append(
            AppliedOp(
                node=self.spec.name,
                session_id=ref,
                request_number=number,
                action=kind,
                msisdn=msisdn,
                amount_minor=amount_minor,
                result_code=result,
                balance_after_minor=self.balance(msisdn),
                bundle_kind=bundle.kind if bundle is not None else "",
                units=bundle.quantity if bundle is not None else 0,
            )
        )


def _check_amount(amount_minor: int, *, allow_zero: bool) -> None:
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise TypeError(f"amounts are integer minor units, got {amount_minor!r}")
    low = 0 if allow_zero else 1
    if not low <= amount_minor <= AMOUNT_MAX_MINOR:
        raise ValueError(f"amount {amount_minor} outside {low}..{AMOUNT_MAX_MINOR}")


# --- Faults ---------------------------------------------------------------------------


@dataclass(slots=True)
class InFaults:
    """Faults of one IN node; mutable so they can change at run time."""

    answer_delay_ms: int = 0
    drop_share: float = 0.0  # share of requests applied but never answered
    result_share: dict[int, float] = field(default_factory=dict)  # code -> share forced
    result_msisdns: dict[str, int] = field(default_factory=dict)  # msisdn -> code forced
    silent_watchdog: bool = False  # stop answering DWR

    def validate(self) -> None:
        if self.answer_delay_ms < 0:
            raise ValueError("answer_delay_ms must be >= 0")
        if not 0.0 <= self.drop_share <= 1.0:
            raise ValueError("drop_share must be within 0..1")
        for code in (*self.result_share, *self.result_msisdns.values()):
            if code not in FORCEABLE_RESULTS:
                raise ValueError(f"result {code} cannot be forced; use one of {sorted(FORCEABLE_RESULTS)}")
        if any(not 0.0 <= s <= 1.0 for s in self.result_share.values()):
            raise ValueError("result shares must be within 0..1")
        if sum(self.result_share.values()) > 1.0 + 1e-9:
            raise ValueError("result shares add up to more than 1")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """What the faults decided for one request."""

    delay_ms: int = 0
    drop: bool = False
    forced_result: int | None = None


_NO_FAULT = FaultPlan()


def plan_faults(faults: InFaults, rng: random.Random, msisdn: str) -> FaultPlan:
    """Draw the faults for one request (pure given the random generator)."""
    if not (faults.answer_delay_ms or faults.drop_share or faults.result_share
            or faults.result_msisdns):
        return _NO_FAULT  # no fault configured: nothing drawn, nothing built
    forced = faults.result_msisdns.get(msisdn)
    if forced is None and faults.result_share:
        draw = rng.random()
        cumulative = 0.0
        for code in sorted(faults.result_share):
            cumulative += faults.result_share[code]
            if draw < cumulative:
                forced = code
                break
    drop = faults.drop_share > 0.0 and rng.random() < faults.drop_share
    return FaultPlan(delay_ms=faults.answer_delay_ms, drop=drop, forced_result=forced)


def parse_share_map(items: Iterable[str]) -> dict[int, float]:
    """CLI `CODE=SHARE` items (`3004=0.1`) → {3004: 0.1}."""
    out: dict[int, float] = {}
    for item in items:
        code, sep, share = item.partition("=")
        if not sep:
            raise ValueError(f"expected CODE=SHARE, got {item!r}")
        out[int(code)] = float(share)
    return out


def parse_msisdn_map(items: Iterable[str]) -> dict[str, int]:
    """CLI `MSISDN=VALUE` items → {msisdn: int(value)}."""
    out: dict[str, int] = {}
    for item in items:
        msisdn, sep, value = item.partition("=")
        if not sep or not msisdn.strip().isdigit():
            raise ValueError(f"expected MSISDN=NUMBER, got {item!r}")
        out[msisdn.strip()] = int(value)
    return out


def find_node(specs: Mapping[str, InNodeSpec], msisdn: str) -> InNodeSpec | None:
    for spec in specs.values():
        if spec.owns(msisdn):
            return spec
    return None


# --- The Diameter glue ----------------------------------------------------------------

NODE_PEER_GROUP = "node"  # the peer group each IN node uses to reach the Extra Balance node
RECHARGE_TOPIC_PREFIX = "extrabalance/recharge"


@dataclass(frozen=True, slots=True)
class NodePeer:
    """Where the Extra Balance node listens, for out-of-balance CCRs."""

    host: str
    port: int
    origin_host: str
    realm: str


@dataclass(frozen=True, slots=True)
class MqttTarget:
    host: str
    port: int
    topic_prefix: str = RECHARGE_TOPIC_PREFIX
    client_id_prefix: str = "in-sim"


class InSimulator:
    """Several simulated IN nodes in one process, each its own Diameter peer.

    Each IN node listens on its own port with its own Origin-Host (the node connects
    to it as a client for balance operations) and, when `node_peer` is given, connects
    to the Extra Balance node as a client for out-of-balance requests.
    """

    def __init__(
        self,
        nodes: Iterable[InNodeSpec],
        node_peer: NodePeer | tuple[str, int, str, str] | Iterable[NodePeer] | None = None,
        currency_numeric: int = 818,
        currency_exponent: int = 2,
        service_context_id: str = "extrabalance@3gpp.org",
        *,
        currency: str = "EGP",
        mqtt: MqttTarget | None = None,
        faults: InFaults | Mapping[str, InFaults] | None = None,
        initial_balance_minor: int = 0,
        answers_max: int = ANSWERS_MAX,
        watchdog_s: float = 30.0,
        request_timeout_ms: int = 2000,
        allowed_peers: Iterable[str] | None = None,
        seed: int | None = None,
        advance_confirmation: bool = False,
        oob_resends_max: int = OOB_RESENDS_MAX,
        reject_nonstandard: bool = False,
        election: bool = False,
    ) -> None:
        specs = list(nodes)
        if not specs:
            raise ValueError("an IN simulator needs at least one IN node")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"IN node names repeat: {names}")
        self.node_peers = _node_peers(node_peer)
        # The first node peer; the only one unless the node runs as several processes.
        self.node_peer = self.node_peers[0] if self.node_peers else None
        self.currency = currency
        self.currency_numeric = currency_numeric
        self.currency_exponent = currency_exponent
        self.service_context_id = service_context_id
        self.mqtt = mqtt
        self.watchdog_s = watchdog_s
        self.request_timeout_ms = request_timeout_ms
        # Origin-Hosts allowed to connect (CER); None accepts any peer.
        self.allowed_peers = None if allowed_peers is None else frozenset(allowed_peers)
        self.advance_confirmation = advance_confirmation
        self.oob_resends_max = oob_resends_max
        # Answer what the node does outside the standards with an error instead of
        # only counting it (see "Strict by default" above).
        self.reject_nonstandard = reject_nonstandard
        # RFC 6733 §5.6.4 with the node: one connection, whichever side dialled it.
        self.election = election
        # (Session-Id, CC-Request-Number) → (Origin-Host, End-to-End id) of the node's
        # requests seen, per IN node: a re-send must keep the id (RFC 6733 §3).
        self._seen_e2e: dict[str, OrderedDict[tuple[str, int], tuple[str, int]]] = {
            s.name: OrderedDict() for s in specs}
        self._rng = random.Random(seed)
        self._sweeper: asyncio.Task[None] | None = None
        self._ledger: deque[AppliedOp] = deque(maxlen=APPLIED_MAX)
        self.specs: dict[str, InNodeSpec] = {s.name: s for s in specs}
        self.accounts: dict[str, InAccounts] = {
            s.name: InAccounts(
                s, initial_balance_minor=initial_balance_minor, answers_max=answers_max,
                ledger=self._ledger, confirmation_extension=advance_confirmation,
            )
            for s in specs
        }
        self._faults: dict[str, InFaults] = {}
        for s in specs:
            if isinstance(faults, InFaults):
                chosen = InFaults(
                    faults.answer_delay_ms, faults.drop_share, dict(faults.result_share),
                    dict(faults.result_msisdns), faults.silent_watchdog,
                )
            elif faults is not None and s.name in faults:
                chosen = faults[s.name]
            else:
                chosen = InFaults()
            chosen.validate()
            self._faults[s.name] = chosen
        self._diameter: dict[str, Any] = {}
        self._ports: dict[str, int] = {}
        self._publishers: dict[str, Any] = {}
        self._session_ids: dict[str, Any] = {}
        self._event_numbers = itertools.count(1)
        # A restarted simulator must not re-use event ids the node has already seen:
        # the run's start time (ms, hex) is part of every id.
        self._event_epoch = f"{int(SYSTEM_CLOCK.time() * 1000):x}"
        self.stats: dict[str, Counter[str]] = {s.name: Counter() for s in specs}
        if mqtt is not None:
            # Publishers connect lazily, on the first recharge.
            from simulators.recharge_publisher import RechargePublisher

            for spec in specs:
                self._publishers[spec.name] = RechargePublisher(
                    mqtt.host, mqtt.port, f"{mqtt.client_id_prefix}-{spec.name}", mqtt.topic_prefix
                )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> dict[str, int]:
        """Listen on every IN node's port; connect to the node when `node_peer` is set.

        Returns {IN node name: listening port}.
        """
        from extrabalance.diameter.gy import SessionIdGenerator

        for spec in self.specs.values():
            diameter = self._make_node(spec)
            self._diameter[spec.name] = diameter
            self._ports[spec.name] = await diameter.listen(spec.host, spec.port)
            self._session_ids[spec.name] = SessionIdGenerator(spec.origin_host)
            if self.node_peer is not None:
                self._add_node_peer(spec.name, diameter)
        self._sweeper = asyncio.create_task(self._silence_sweeper())
        return dict(self._ports)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for publisher in self._publishers.values():
            with contextlib.suppress(Exception):
                await publisher.close()
        for diameter in self._diameter.values():
            result = diameter.close()
            if asyncio.iscoroutine(result):
                await result
        self._diameter.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def ports(self) -> dict[str, int]:
        return dict(self._ports)

    # -- balances and the ledger -------------------------------------------------------

    def owner(self, msisdn: str) -> InAccounts:
        """The account book of the IN node serving `msisdn` (KeyError if none does)."""
        for book in self.accounts.values():
            if book.owns(msisdn):
                return book
        raise KeyError(f"no simulated IN node serves {msisdn}")

    def set_balance(self, msisdn: str, amount_minor: int) -> None:
        self.owner(msisdn).set_balance(msisdn, amount_minor)

    def balance(self, msisdn: str) -> int:
        return self.owner(msisdn).balance(msisdn)

    def balances(self) -> dict[str, int]:
        """Every balance touched so far, all IN nodes together."""
        out: dict[str, int] = {}
        for book in self.accounts.values():
            out.update(book.balances())
        return out

    def buckets(self, msisdn: str) -> dict[str, int]:
        """His bundle buckets on his IN node: units by kind (data octets, voice
        seconds, SMS)."""
        return self.owner(msisdn).buckets(msisdn)

    def applied(self) -> list[AppliedOp]:
        """Every operation that got a final answer, grants and recharges, oldest first."""
        return list(self._ledger)

    def spend(self, msisdn: str, amount_minor: int | None = None) -> int:
        """Usage eating the balance (all of it by default); returns what was spent."""
        book = self.owner(msisdn)
        return book.spend(msisdn, book.balance(msisdn) if amount_minor is None else amount_minor)

    # -- faults, at run time -----------------------------------------------------------

    def _targets(self, node: str | None) -> list[InFaults]:
        if node is None:
            return list(self._faults.values())
        if node not in self._faults:
            raise KeyError(f"no IN node named {node!r}")
        return [self._faults[node]]

    def faults(self, node: str) -> InFaults:
        return self._faults[node]

    def set_delay(self, delay_ms: int, node: str | None = None) -> None:
        for f in self._targets(node):
            f.answer_delay_ms = delay_ms
            f.validate()

    def set_drop_share(self, share: float, node: str | None = None) -> None:
        """Apply but never answer this share of requests."""
        for f in self._targets(node):
            f.drop_share = share
            f.validate()

    def set_result_share(self, result_code: int, share: float, node: str | None = None) -> None:
        """Force `result_code` (3002/3004/4010/4012/5030) on this share of requests."""
        for f in self._targets(node):
            if share:
                f.result_share[result_code] = share
            else:
                f.result_share.pop(result_code, None)
            f.validate()

    def force_result(self, msisdn: str, result_code: int | None, node: str | None = None) -> None:
        """Force `result_code` on every request for `msisdn` (None: stop forcing)."""
        for f in self._targets(node):
            if result_code is None:
                f.result_msisdns.pop(msisdn, None)
            else:
                f.result_msisdns[msisdn] = result_code
            f.validate()

    def set_silent_watchdog(self, silent: bool, node: str | None = None) -> None:
        """Stop (or resume) answering DWR: the node should find the peer suspect, then down."""
        for name in [node] if node is not None else list(self._faults):
            self._targets(name)[0].silent_watchdog = silent
            diameter = self._diameter.get(name)
            if diameter is not None:
                _set_watchdog_silence(diameter, silent)

    def clear_faults(self, node: str | None = None) -> None:
        for name in [node] if node is not None else list(self._faults):
            self._faults[name] = InFaults()
            diameter = self._diameter.get(name)
            if diameter is not None:
                _set_watchdog_silence(diameter, False)

    async def disconnect(self, node: str | None = None) -> int:
        """Drop every Diameter connection of the IN node(s); returns how many were closed."""
        closed = 0
        for name in [node] if node is not None else list(self._diameter):
            closed += await _drop_connections(self._diameter[name])
            self.stats[name]["disconnects"] += 1
        return closed

    # -- node → IN: balance operations (we are the server) -----------------------------

    async def _handle(self, name: str, request: Message) -> Message | None:
        """One request from the node to IN node `name`; None means "do not answer"."""
        answer = self._answer_now(name, request)
        if isinstance(answer, Message):
            return answer
        return await answer

    def _answer_now(self, name: str, request: Message) -> Message | Awaitable[Message | None]:
        """The answer to one request, at once when no fault plan delays or drops it
        (then the DiameterNode sends it without a task), else an awaitable of it
        (None: "do not answer")."""
        spec = self.specs[name]
        stats = self.stats[name]
        stats["requests"] += 1
        if request.is_retransmit:
            stats["requests_t_flag"] += 1
        if request.command_code != CMD_CREDIT_CONTROL:
            stats["unsupported_command"] += 1
            return self._error(request, spec, 3001, "only Credit-Control is served here")
        try:
            ccr = gy.parse_ccr(request, self.currency_exponent)
            op = self._balance_op(ccr, spec, request)
        except codec.DiameterError as exc:
            stats[f"invalid_{exc.result_code}"] += 1
            return codec.error_answer(exc, spec.origin_host, spec.realm, request)
        nonstandard = self._note_transmission(name, op, request)
        if self.reject_nonstandard:
            accounts = self.accounts[name]
            if nonstandard is None and accounts.own_session_refund(op):
                accounts.stats["nonstandard_refund_own_session"] += 1
                nonstandard = ("REFUND_ACCOUNT under a Session-Id of this IN's own: "
                               "no confirmation extension here")
            if nonstandard is not None:
                # Neither executed nor stored: the same request is refused every time.
                stats["rejected_nonstandard"] += 1
                return self._error(request, spec, DIAMETER_UNABLE_TO_COMPLY, nonstandard)
        faults = self._faults[name]
        plan = plan_faults(faults, self._rng, op.msisdn)
        if ccr.destination_realm.lower() != spec.realm.lower():
            # RFC 6733 §6.1: not our realm; we relay nothing (3003, E bit, not applied).
            stats["misrouted"] += 1
            return self._error(request, spec, 3003, "Destination-Realm not served here")
        if ccr.destination_host is not None and ccr.destination_host != spec.origin_host:
            # A request for another IN node must never be executed here.
            stats["misrouted"] += 1
            answer = OpAnswer(DIAMETER_UNABLE_TO_DELIVER)
            duplicate = False
        else:
            answer, duplicate = self.accounts[name].execute(op, forced_result=plan.forced_result)
        stats["duplicates" if duplicate else f"result_{answer.result_code}"] += 1
        if plan.delay_ms or plan.drop:
            return self._answer_later(name, request, answer, plan.delay_ms, plan.drop)
        return self._cca(name, request, answer)

    async def _answer_later(self, name: str, request: Message, answer: OpAnswer,
                            delay_ms: float, drop: bool) -> Message | None:
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        if drop:
            self.stats[name]["dropped"] += 1
            return None
        return self._cca(name, request, answer)

    def _cca(self, name: str, request: Message, answer: OpAnswer) -> Message:
        spec = self.specs[name]
        self.stats[name]["answered"] += 1
        return gy.build_cca(
            request,
            spec.origin_host,
            spec.realm,
            answer.result_code,
            answer.granted_minor,
            None if answer.check_balance_result is None else int(answer.check_balance_result),
            currency_numeric=self.currency_numeric,
            currency_exponent=self.currency_exponent,
            granted_units=answer.granted_units,
        )

    def _note_transmission(self, name: str, op: BalanceOp, request: Message) -> str | None:
        """Count what RFC 6733 §3 / §5.5.4 forbid: a T flag on the first request of a
        key we see, and a re-send of a key under another End-to-End id. Returns why the
        request is to be refused in reject_nonstandard mode (the changed End-to-End
        id only: a T flag on the first copy we see cannot be told apart from a re-send
        whose first copy was lost, so an IN processes it, and so do we).

        An End-to-End id is unique per originator (RFC 6733 §3: with the Origin-Host it
        detects duplicates), so a key sent again by another node of the realm (it took
        over an operation a stopped node left: docs/scale-out.md) carries that node's
        own id; it is counted as `requests_from_another_node`, and its first answer
        replayed as for any duplicate (RFC 4006 §5.1: Session-Id and
        CC-Request-Number)."""
        seen = self._seen_e2e[name]
        key = (op.session_id, op.request_number)
        origin = _origin_host(request).lower()
        first = seen.get(key)
        if first is None:
            if request.is_retransmit:
                self.stats[name]["nonstandard_t_flag_on_first_request"] += 1
            seen[key] = (origin, request.end_to_end_id)
            if len(seen) > ANSWERS_MAX:
                seen.popitem(last=False)
            return None
        first_origin, first_e2e = first
        if first_origin != origin:
            self.stats[name]["requests_from_another_node"] += 1
        elif first_e2e != request.end_to_end_id:
            self.stats[name]["nonstandard_end_to_end_changed"] += 1
            return (f"Session-Id and CC-Request-Number re-sent under End-to-End id "
                    f"{request.end_to_end_id:#010x}, first seen under {first_e2e:#010x}")
        return None

    def nonstandard(self) -> dict[str, int]:
        """Non-standard behaviour of the node seen so far, summed over the IN nodes
        (every value 0 for a node that follows RFC 6733 / RFC 4006 alone)."""
        out = {"nonstandard_t_flag_on_first_request": 0, "nonstandard_end_to_end_changed": 0,
               "nonstandard_refund_own_session": 0}
        for name, stats in self.stats.items():
            for key in out:
                out[key] += stats.get(key, 0)
            out["nonstandard_refund_own_session"] += \
                self.accounts[name].stats["nonstandard_refund_own_session"]
        return out

    def _balance_op(self, ccr: Any, spec: InNodeSpec, request: Message) -> BalanceOp:
        if ccr.request_type != 4:
            raise codec.DiameterError(
                5004, "balance operations are EVENT requests (CC-Request-Type 4)",
                (codec.avp(AVP_CC_REQUEST_TYPE, ccr.request_type),), request,
            )
        if ccr.requested_action is None:
            raise codec.DiameterError(
                5005, "Requested-Action missing", (codec.avp(AVP_REQUESTED_ACTION, 0),), request
            )
        if ccr.bundle is not None:
            # A bundle credit: units in an MSCC, no money (RFC 4006 §8.16).
            if ccr.requested_action != Action.REFUND_ACCOUNT:
                raise codec.DiameterError(
                    5004, "units other than money are credited only (REFUND_ACCOUNT)",
                    (codec.avp(AVP_REQUESTED_ACTION, ccr.requested_action),), request)
            return BalanceOp(ccr.session_id, ccr.request_number, Action.REFUND_ACCOUNT,
                             ccr.msisdn, 0, ccr.bundle)
        if ccr.requested_minor is None:
            raise codec.DiameterError(
                5005, "Requested-Service-Unit with CC-Money missing",
                (codec.avp(AVP_REQUESTED_SERVICE_UNIT, ()),), request,
            )
        if ccr.currency_numeric is not None and ccr.currency_numeric != self.currency_numeric:
            raise codec.DiameterError(
                5004, f"Currency-Code {ccr.currency_numeric}, this IN keeps {self.currency_numeric}",
                (), request,
            )
        if ccr.requested_minor > AMOUNT_MAX_MINOR:
            raise codec.DiameterError(5004, "amount over the IN's bound", (), request)
        return BalanceOp(
            ccr.session_id, ccr.request_number, Action(ccr.requested_action), ccr.msisdn,
            ccr.requested_minor,
        )

    def _error(self, request: Message, spec: InNodeSpec, code: int, text: str) -> Message:
        return codec.error_answer(codec.DiameterError(code, text), spec.origin_host, spec.realm,
                                  request)

    # -- IN → node: out-of-balance (we are the client) ---------------------------------

    async def wait_connected(self, timeout_s: float = 5.0, *, every_node: bool = False) -> None:
        """Wait until every IN node has an open connection to the Extra Balance node
        (to each of the nodes with `every_node`, when there are several)."""
        if self.node_peer is None:
            raise RuntimeError("no node_peer configured")
        await asyncio.gather(
            *(d.wait_ready(NODE_PEER_GROUP, timeout_s) for d in self._diameter.values())
        )
        if every_node:
            async with asyncio.timeout(timeout_s):
                while not all(self.open_node_peers(name) == len(self.node_peers)
                              for name in self._diameter):
                    await asyncio.sleep(NODE_PEER_POLL_S)

    def open_node_peers(self, name: str) -> int:
        """How many Extra Balance nodes IN node `name` has an open connection to."""
        rows = self._diameter[name].peer_states()
        return sum(1 for r in rows if r["group"] == NODE_PEER_GROUP and r["state"] == "Open")

    async def send_out_of_balance(
        self,
        msisdn: str,
        node_name: str | None = None,
        requested_minor: int | None = None,
        request_type: int = 4,
        *,
        request_number: int = 0,
        session_id: str | None = None,
        mscc: bool = False,
    ) -> tuple[int, int | None]:
        """Send the node an out-of-balance CCR for `msisdn`; returns (result, granted_minor).

        On 2001 with Granted-Service-Unit the granted amount is added to the balance,
        as a real IN does, and recorded in the ledger, once per Session-Id +
        CC-Request-Number (`InAccounts.apply_grant`). An answer later than
        `request_timeout_ms` is discarded, as when none came; the same CCR is then
        re-sent with the T flag and the same End-to-End id (RFC 6733 §5.5.4), at most
        `oob_resends_max` times, and RequestTimeout raised when none is answered in
        time. Re-sending with the same `session_id` and `request_number` tests the
        node's exactly-once handling.
        """

        if self.node_peer is None:
            raise RuntimeError("no node_peer configured: the IN cannot reach the node")
        name = node_name if node_name is not None else self.owner(msisdn).spec.name
        spec = self.specs[name]
        stats = self.stats[name]
        sid = session_id if session_id is not None else self._session_ids[name].next()
        ccr = gy.CreditControlRequest(
            session_id=sid,
            origin_host=spec.origin_host,
            origin_realm=spec.realm,
            destination_realm=self.node_peer.realm,
            # Several nodes serve the realm: realm-routed, so that any of them may take
            # the request and its failover copy (RFC 6733 §6.1, §5.5.4).
            destination_host=(self.node_peer.origin_host if len(self.node_peers) == 1
                              else None),
            request_type=request_type,
            request_number=request_number,
            msisdn=msisdn,
            service_context_id=self.service_context_id,
            requested_minor=requested_minor,
            currency_numeric=self.currency_numeric if requested_minor is not None else None,
            has_mscc=mscc,
            event_timestamp=gy.ntp_now(),
        )
        from extrabalance.diameter.aio.node import RequestTimeout
        from extrabalance.diameter.codec import FLAG_RETRANSMIT

        diameter = self._diameter[name]
        message = gy.build_ccr(ccr, currency_exponent=self.currency_exponent,
                               end_to_end_id=diameter.new_end_to_end_id())
        reply: Message | None = None
        for send in range(self.oob_resends_max + 1):
            stats["oob_sent" if send == 0 else "oob_resent_t_flag"] += 1
            started = time.monotonic()
            try:
                reply = await diameter.request(NODE_PEER_GROUP, message)
            except RequestTimeout:
                reply = None
            if reply is not None and (time.monotonic() - started) * 1000 > self.request_timeout_ms:
                # The answer came after our timer: a real IN has given up on the request
                # and discards it (DiameterNode checks its deadlines on a timer tick, so
                # an answer can slip in just after one).
                stats["oob_late_discarded"] += 1
                reply = None
            if reply is not None:
                break
            message = message.with_flags(FLAG_RETRANSMIT)  # it may have been received
        if reply is None:
            raise RequestTimeout(f"no answer within {self.request_timeout_ms} ms")
        cca = gy.parse_cca(reply, self.currency_exponent)
        stats[f"oob_result_{cca.result_code}"] += 1
        if len(self.node_peers) > 1:
            stats[f"oob_answered_by {_origin_host(reply)}"] += 1
        if cca.result_code == DIAMETER_SUCCESS and cca.granted_minor:
            book = self.accounts[name]
            if book.owns(msisdn):
                if book.apply_grant(sid, request_number, msisdn, cca.granted_minor):
                    stats["oob_granted"] += 1
                else:
                    stats["oob_grant_duplicate"] += 1
        return cca.result_code, cca.granted_minor

    async def run_out(self, msisdn: str, requested_minor: int | None = None) -> tuple[int, int | None]:
        """Traffic: the subscriber uses up his balance, then the IN asks the node for credit."""
        self.spend(msisdn)
        return await self.send_out_of_balance(msisdn, requested_minor=requested_minor)

    # -- recharges ---------------------------------------------------------------------

    async def recharge(self, msisdn: str, amount_minor: int) -> RechargeEvent:
        """Top up `msisdn` and publish the recharge event (QoS 1, retried until PUBACK).

        Without an MQTT target the event is built and returned, not published.
        """
        event = self.top_up(msisdn, amount_minor)
        await self.publish_recharge(event)
        return event

    def top_up(self, msisdn: str, amount_minor: int) -> RechargeEvent:
        """Credit `msisdn` on its IN node's books and build the recharge event
        (:meth:`publish_recharge` sends it)."""
        from extrabalance.recharge.events import RechargeEvent

        book = self.owner(msisdn)
        spec = book.spec
        event_id = f"{spec.name.upper()}-{self._event_epoch}-{next(self._event_numbers):09d}"
        after = book.add(msisdn, amount_minor, kind=KIND_RECHARGE, ref=event_id)
        self.stats[spec.name]["recharges"] += 1
        return RechargeEvent(
            event_id=event_id,
            msisdn=msisdn,
            amount_minor=amount_minor,
            currency=self.currency,
            balance_after_minor=after,
            in_node=spec.origin_host,
            timestamp=SYSTEM_CLOCK.now(),
        )

    async def publish_recharge(self, event: RechargeEvent) -> None:
        """Publish a recharge made by :meth:`top_up` (returns once the broker has it)."""
        name = self.owner(event.msisdn).spec.name
        publisher = self._publishers.get(name)
        if publisher is not None:
            await publisher.publish(event)
            self.stats[name]["recharges_published"] += 1

    def stats_summary(self) -> dict[str, dict[str, int]]:
        return {name: dict(sorted(c.items())) for name, c in self.stats.items()}

    # -- DiameterNode wiring -----------------------------------------------------------

    def _make_node(self, spec: InNodeSpec) -> Any:
        from extrabalance.diameter.aio.node import DiameterNode, LocalIdentity

        name = spec.name

        async def later(pending: Awaitable[Message | None]) -> Message:
            answer = await pending
            if answer is None:
                # A dropped answer. DiameterNode has no "do not answer" result, but a
                # handler that ends cancelled sends nothing and frees its slot.
                raise asyncio.CancelledError
            return answer

        def handler(request: Message, peer_origin_host: str) -> Message | Awaitable[Message]:
            answer = self._answer_now(name, request)
            if isinstance(answer, Message):
                return answer  # answered in this turn: no task
            return later(answer)

        return DiameterNode(
            LocalIdentity(
                origin_host=spec.origin_host,
                origin_realm=spec.realm,
                host_ip=spec.host if spec.host[:1].isdigit() else "127.0.0.1",
                product_name="ExtraBalance IN simulator",
            ),
            allowed_peers=self.allowed_peers,
            request_handler=handler,
            watchdog_s=self.watchdog_s,
            request_timeout_ms=self.request_timeout_ms,
            # The simulator keeps its own first-answer table keyed by Session-Id and
            # CC-Request-Number (what an OCS does); DiameterNode's cache by End-to-End
            # id would also hold back the retry of a dropped answer forever.
            duplicate_cache=_NoDuplicateCache(),
            reconnect_min_s=RECONNECT_MIN_S,
            reconnect_max_s=RECONNECT_MAX_S,
            rng=random.Random(self._rng.random()),
            election=self.election,
        )

    def _add_node_peer(self, name: str, diameter: Any) -> None:
        from extrabalance.diameter.aio.node import PeerAddress

        assert self.node_peer is not None
        diameter.add_peer_group(
            NODE_PEER_GROUP, self.node_peer.realm,
            [PeerAddress(p.host, p.port, p.origin_host) for p in self.node_peers],
        )

    async def _silence_sweeper(self) -> None:
        """Keep every connection of a silent IN node without DWA, new ones included."""
        while True:
            for name, faults in self._faults.items():
                diameter = self._diameter.get(name)
                if diameter is not None:
                    _set_watchdog_silence(diameter, faults.silent_watchdog)
            await asyncio.sleep(SILENCE_SWEEP_S)


def _node_peers(
    given: NodePeer | tuple[str, int, str, str] | Iterable[NodePeer] | None,
) -> tuple[NodePeer, ...]:
    """The Extra Balance nodes as a tuple: one `NodePeer` (or its 4-tuple), several, or none.

    Several nodes are one Diameter realm (the IN routes to the realm, not a host), each
    with its own Origin-Host."""
    if given is None:
        return ()
    if isinstance(given, NodePeer):
        return (given,)
    if isinstance(given, tuple) and len(given) == 4 and isinstance(given[1], int):
        return (NodePeer(*given),)
    peers = tuple(p if isinstance(p, NodePeer) else NodePeer(*p) for p in given)
    if len(peers) > NODE_PEERS_MAX:
        raise ValueError(f"at most {NODE_PEERS_MAX} Extra Balance nodes")
    if len({p.realm.lower() for p in peers}) > 1:
        raise ValueError("the Extra Balance nodes must share one realm: "
                         + ", ".join(sorted({p.realm for p in peers})))
    hosts = [p.origin_host.lower() for p in peers]
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"each Extra Balance node needs its own Origin-Host: {hosts}")
    return peers


def _origin_host(message: Message) -> str:
    from extrabalance.diameter.constants import AVP_ORIGIN_HOST

    value = message.get(AVP_ORIGIN_HOST)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value) if value is not None else "?"


NODE_PEERS_MAX = 64  # Extra Balance nodes one IN node dials
NODE_PEER_POLL_S = 0.02  # how often wait_connected(every_node=True) looks again
RECONNECT_MIN_S = 0.2  # the IN redials the node quickly: disconnect faults heal fast
RECONNECT_MAX_S = 5.0
SILENCE_SWEEP_S = 0.05  # how soon a new connection of a silent IN node is silenced too
CMD_DEVICE_WATCHDOG = 280


def _without_watchdog(data: bytes) -> bytes:
    """Remove Device-Watchdog requests and answers from a run of whole encoded messages.

    Both directions go: a hung IN neither answers DWR nor sends its own (which would
    bring a SUSPECT peer back to OPEN on the node's side).
    """
    kept: list[bytes] = []
    i = 0
    while i + 20 <= len(data):
        length = int.from_bytes(data[i + 1:i + 4], "big")
        if length < 20:
            kept.append(data[i:])  # not ours to judge: pass it on unchanged
            break
        command = int.from_bytes(data[i + 5:i + 8], "big")
        if command != CMD_DEVICE_WATCHDOG:
            kept.append(data[i:i + length])
        i += length
    else:
        kept.append(data[i:])
    return b"".join(kept)


def _set_watchdog_silence(diameter: Any, silent: bool) -> None:
    """Make the IN node's connections stop (or resume) the watchdog exchange.

    DiameterNode has no switch for this; the peer state machine answers DWR itself.
    We filter DWR/DWA out of what each connection sends, per connection instance, so
    the Extra Balance node in the same process (tests) is unaffected.
    """
    for connection in list(getattr(diameter, "_connections", ())):
        peer = connection.peer
        patched = "data_to_send" in vars(peer)
        if silent and not patched:
            original = peer.data_to_send
            peer.data_to_send = lambda original=original: _without_watchdog(original())
        elif not silent and patched:
            del peer.data_to_send


async def _drop_connections(diameter: Any) -> int:
    """Abort every transport of the IN node (no DPR: a crash or a cut cable)."""
    connections = list(getattr(diameter, "_connections", ()))
    for connection in connections:
        transport = connection.transport
        if transport is not None and not transport.is_closing():
            transport.abort()
    await asyncio.sleep(0)
    return len(connections)


class _NoDuplicateCache(DuplicateCache):
    """Stands in for DiameterNode's End-to-End duplicate cache: remembers nothing."""

    def get(self, origin_host: str, end_to_end_id: int, now: float) -> None:
        return None

    def put(self, origin_host: str, end_to_end_id: int, value: Any, now: float) -> None:
        return None

    def __len__(self) -> int:
        return 0


# --- `extrabalance sim in` ---------------------------------------------------------------

CONSOLE_HELP = """\
commands (one per line on stdin):
  balance MSISDN                 show a balance
  set MSISDN AMOUNT_MINOR        set a balance
  spend MSISDN [AMOUNT_MINOR]    usage eats the balance (all of it by default)
  oob MSISDN [AMOUNT_MINOR]      send the node an out-of-balance CCR
  recharge MSISDN AMOUNT_MINOR   top up and publish the recharge on MQTT
  delay MS [NODE]                answer delay
  drop SHARE [NODE]              apply but do not answer this share
  result CODE SHARE [NODE]       force 3002/3004/4010/4012/5030 on a share (0 stops)
  force MSISDN CODE|off          force a result for one subscriber
  silent on|off [NODE]           stop/resume answering DWR
  disconnect [NODE]              drop the Diameter connections
  clear [NODE]                   remove every fault
  stats                          counters
  help"""


def parse_node_arg(text: str, host: str) -> InNodeSpec:
    """`NAME,ORIGIN_HOST,REALM,PORT,RANGE[;RANGE...]` → InNodeSpec."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 5:
        raise ValueError(f"expected NAME,ORIGIN_HOST,REALM,PORT,RANGES, got {text!r}")
    name, origin_host, realm, port, ranges = parts
    return InNodeSpec(
        name=name, origin_host=origin_host, realm=realm, host=host, port=int(port),
        ranges=tuple(MsisdnRange.parse(r) for r in ranges.split(";") if r.strip()),
    )


def parse_node_peer_arg(text: str) -> NodePeer:
    """`HOST:PORT:ORIGIN_HOST:REALM` → NodePeer."""
    parts = text.split(":")
    if len(parts) != 4 or not parts[1].isdigit():
        raise ValueError(f"expected HOST:PORT:ORIGIN_HOST:REALM, got {text!r}")
    host, port, origin_host, realm = parts
    return NodePeer(host, int(port), origin_host, realm)


def specs_from_config(path: str, host: str) -> tuple[list[InNodeSpec], NodePeer, dict[str, Any]]:
    """IN nodes (`[[in_nodes]]`, first peer's port), the node's own address, [node] values.

    Read straight from the node's TOML so both sides use one file; the simulator does
    not import the node's config code.
    """
    import tomllib

    with open(path, "rb") as f:
        doc = tomllib.load(f)
    specs = []
    for entry in doc.get("in_nodes", []):
        ranges: list[MsisdnRange] = []
        for r in entry.get("ranges", []):
            ranges.append(
                MsisdnRange(prefix=r["prefix"]) if "prefix" in r
                else MsisdnRange(start=r["start"], end=r["end"])
            )
        peers = entry.get("peers") or [{"port": 0}]
        specs.append(
            InNodeSpec(
                name=entry["name"], origin_host=entry["origin_host"], realm=entry["realm"],
                host=host, port=int(peers[0].get("port", 0)), ranges=tuple(ranges),
            )
        )
    node = doc.get("node", {})
    diameter = doc.get("diameter", {})
    peer = NodePeer(
        diameter.get("listen_host", "127.0.0.1"), int(diameter.get("listen_port", 3868)),
        node.get("origin_host", "eb.operator.example"), node.get("origin_realm", "operator.example"),
    )
    return specs, peer, {**node, "service_context_id": diameter.get("service_context_id")}


def build_in_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="extrabalance sim in",
        description="Prepaid IN / OCS simulator: several IN nodes speaking Diameter Gy.",
        epilog=CONSOLE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="read IN nodes, the node's address and currency from this TOML")
    p.add_argument("--host", default="127.0.0.1", help="address the IN nodes listen on")
    p.add_argument("--node", action="append", default=[], metavar="NAME,HOST,REALM,PORT,RANGES",
                   help="an IN node (repeatable); RANGES: START-END or PREFIX*, ';'-separated")
    p.add_argument("--node-peer", action="append", default=[],
                   metavar="HOST:PORT:ORIGIN_HOST:REALM",
                   help="the Extra Balance node, for out-of-balance CCRs; repeat it for"
                        " several nodes (one realm, each its own Origin-Host): the CCRs"
                        " are spread over them and fail over to another when one goes")
    p.add_argument("--no-node-peer", action="store_true", help="never connect to the node")
    p.add_argument("--election", action="store_true",
                   help="one connection per node, whichever side dialled it (RFC 6733 §5.6.4):"
                        " a node that dials this IN is used for the IN's CCRs to it")
    p.add_argument("--currency", default=None)
    p.add_argument("--currency-numeric", type=int, default=None)
    p.add_argument("--currency-exponent", type=int, default=None)
    p.add_argument("--service-context-id", default=None)
    p.add_argument("--initial-balance", type=int, default=0, help="minor units for every subscriber")
    p.add_argument("--balance", action="append", default=[], metavar="MSISDN=AMOUNT_MINOR")
    p.add_argument("--watchdog-s", type=float, default=30.0)
    p.add_argument("--advance-confirmation", action="store_true",
                   help="opt-in: the IN of the advance confirmation extension (it keys a"
                        " CCA's grant and the node's confirmation as one operation); by"
                        " default the IN follows RFC 4006 alone")
    p.add_argument("--reject-nonstandard", action="store_true",
                   help="answer 5012 DIAMETER_UNABLE_TO_COMPLY (not executed) to a request"
                        " re-sent under another End-to-End id and to a REFUND_ACCOUNT under"
                        " one of this IN's own Session-Ids, instead of only counting them")
    # faults
    p.add_argument("--delay-ms", type=int, default=0, help="answer delay")
    p.add_argument("--drop", type=float, default=0.0, help="share of answers dropped (applied)")
    p.add_argument("--result", action="append", default=[], metavar="CODE=SHARE",
                   help="force a result (3002/3004/4010/4012/5030) on a share")
    p.add_argument("--result-msisdn", action="append", default=[], metavar="MSISDN=CODE")
    p.add_argument("--silent-watchdog", action="store_true", help="never answer DWR")
    p.add_argument("--seed", type=int, default=None)
    # recharges and traffic
    p.add_argument("--mqtt", metavar="HOST:PORT", help="broker for recharge events")
    p.add_argument("--mqtt-topic-prefix", default=RECHARGE_TOPIC_PREFIX)
    p.add_argument("--oob-rate", type=float, default=0.0,
                   help="subscribers run out of credit per second (out-of-balance CCRs)")
    p.add_argument("--recharge-rate", type=float, default=0.0, help="recharges per second")
    p.add_argument("--recharge-minor", type=int, nargs=2, default=(500, 5000),
                   metavar=("LOW", "HIGH"))
    p.add_argument("--msisdns", default=None,
                   help="virtual subscribers for traffic, START-END (default: first 1000 of each range)")
    p.add_argument("--no-console", action="store_true", help="do not read commands from stdin")
    return p


def _read_stdin(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str]) -> None:
    while True:
        try:
            line = sys.stdin.readline()
        except (OSError, ValueError):
            line = ""
        try:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        except RuntimeError:  # the loop is closed: the simulator has stopped
            return
        if not line:
            return


async def _console(sim: InSimulator, stop: asyncio.Event) -> None:
    # stdin is read by a daemon thread, not the loop's executor: asyncio.run waits for
    # its executor's threads at exit, and one blocked in readline() would hold Ctrl-C
    # until the user pressed Enter.
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    threading.Thread(target=_read_stdin, args=(loop, lines), name="sim-in-console",
                     daemon=True).start()
    while not stop.is_set():
        line = await lines.get()
        if not line:
            return  # stdin closed: keep serving, stop reading
        try:
            out = await _console_command(sim, line.split())
        except (ValueError, KeyError, TypeError, RuntimeError, OSError, TimeoutError) as exc:
            out = f"error: {exc}"
        if out:
            print(out, flush=True)


async def _console_command(sim: InSimulator, words: list[str]) -> str:
    if not words:
        return ""
    cmd, args = words[0].lower(), words[1:]
    node = None
    if cmd == "help":
        return CONSOLE_HELP
    if cmd == "stats":
        return json.dumps(sim.stats_summary(), indent=1)
    if cmd == "balance":
        return f"{args[0]}: {sim.balance(args[0])}"
    if cmd == "set":
        sim.set_balance(args[0], int(args[1]))
        return f"{args[0]}: {sim.balance(args[0])}"
    if cmd == "spend":
        spent = sim.spend(args[0], int(args[1]) if len(args) > 1 else None)
        return f"spent {spent}; {args[0]}: {sim.balance(args[0])}"
    if cmd == "oob":
        result, granted = await sim.send_out_of_balance(
            args[0], requested_minor=int(args[1]) if len(args) > 1 else None
        )
        return f"result {result}, granted {granted}; balance {sim.balance(args[0])}"
    if cmd == "recharge":
        event = await sim.recharge(args[0], int(args[1]))
        return f"{event.event_id}: balance {event.balance_after_minor}"
    if cmd == "delay":
        sim.set_delay(int(args[0]), args[1] if len(args) > 1 else node)
    elif cmd == "drop":
        sim.set_drop_share(float(args[0]), args[1] if len(args) > 1 else node)
    elif cmd == "result":
        sim.set_result_share(int(args[0]), float(args[1]), args[2] if len(args) > 2 else node)
    elif cmd == "force":
        sim.force_result(args[0], None if args[1] == "off" else int(args[1]))
    elif cmd == "silent":
        sim.set_silent_watchdog(args[0] == "on", args[1] if len(args) > 1 else node)
    elif cmd == "disconnect":
        return f"closed {await sim.disconnect(args[0] if args else None)} connection(s)"
    elif cmd == "clear":
        sim.clear_faults(args[0] if args else None)
    else:
        return f"unknown command {cmd!r}; type help"
    return "ok"


async def _traffic_loop(
    sim: InSimulator, kind: str, rate_per_s: float, msisdns: list[str], args: argparse.Namespace,
    stop: asyncio.Event,
) -> None:
    rng = random.Random(args.seed)
    interval_s = 1.0 / rate_per_s
    inflight: set[asyncio.Task[Any]] = set()

    async def one(msisdn: str) -> None:
        try:
            if kind == "oob":
                await sim.run_out(msisdn)
            else:
                await sim.recharge(msisdn, rng.randint(*args.recharge_minor))
        except Exception as exc:  # noqa: BLE001 - traffic keeps going; the failure is counted
            sim.stats[sim.owner(msisdn).spec.name][f"{kind}_error_{type(exc).__name__}"] += 1

    while not stop.is_set():
        if len(inflight) < TRAFFIC_INFLIGHT_MAX:
            task = asyncio.create_task(one(rng.choice(msisdns)))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
    for task in inflight:
        task.cancel()


TRAFFIC_INFLIGHT_MAX = 1000  # out-of-balance requests / recharges in flight from the CLI


async def _run_in(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    defaults: dict[str, Any] = {}
    specs: list[InNodeSpec] = []
    peers: list[NodePeer] = []
    if args.config:
        specs, config_peer, defaults = specs_from_config(args.config, args.host)
        peers = [config_peer]
    if args.node:
        specs = [parse_node_arg(n, args.host) for n in args.node]
    if not specs:
        parser.error("give --node (repeatable) or --config")
    if args.node_peer:
        peers = [parse_node_peer_arg(text) for text in args.node_peer]
    if args.no_node_peer:
        peers = []
    mqtt = None
    if args.mqtt:
        mhost, _, mport = args.mqtt.rpartition(":")
        mqtt = MqttTarget(mhost or "127.0.0.1", int(mport), args.mqtt_topic_prefix)
    faults = InFaults(
        answer_delay_ms=args.delay_ms,
        drop_share=args.drop,
        result_share=parse_share_map(args.result),
        result_msisdns=parse_msisdn_map(args.result_msisdn),
        silent_watchdog=args.silent_watchdog,
    )
    faults.validate()
    sim = InSimulator(
        specs,
        peers or None,
        currency_numeric=args.currency_numeric or int(defaults.get("currency_numeric", 818)),
        currency_exponent=(
            args.currency_exponent if args.currency_exponent is not None
            else int(defaults.get("currency_exponent", 2))
        ),
        service_context_id=(
            args.service_context_id or defaults.get("service_context_id")
            or "extrabalance@3gpp.org"
        ),
        currency=args.currency or defaults.get("currency", "EGP"),
        mqtt=mqtt,
        faults=faults,
        initial_balance_minor=args.initial_balance,
        watchdog_s=args.watchdog_s,
        seed=args.seed,
        advance_confirmation=args.advance_confirmation,
        reject_nonstandard=args.reject_nonstandard,
        election=args.election,
    )
    for msisdn, amount in parse_msisdn_map(args.balance).items():
        sim.set_balance(msisdn, amount)
    ports = await sim.start()
    if faults.silent_watchdog:
        sim.set_silent_watchdog(True)
    for spec in specs:
        print(f"IN node {spec.name} ({spec.origin_host}) on {spec.host}:{ports[spec.name]}"
              f" serving {', '.join(map(str, spec.ranges))}", flush=True)
    for peer in peers:
        print(f"out-of-balance CCRs go to {peer.origin_host} at {peer.host}:{peer.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    from simulators.traffic import expand_msisdns

    if args.msisdns:
        pool = expand_msisdns(args.msisdns)
    else:
        rng = random.Random(args.seed)
        pool = [r.sample(rng) for s in specs for r in s.ranges for _ in range(1000)]
    tasks = []
    if args.oob_rate > 0 and peers:
        tasks.append(asyncio.create_task(_traffic_loop(sim, "oob", args.oob_rate, pool, args, stop)))
    if args.recharge_rate > 0:
        tasks.append(asyncio.create_task(
            _traffic_loop(sim, "recharge", args.recharge_rate, pool, args, stop)))
    if not args.no_console and sys.stdin is not None and sys.stdin.isatty():
        print("type help for commands", flush=True)
        console = asyncio.create_task(_console(sim, stop))
        console.add_done_callback(lambda _t: None)
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        print(json.dumps(sim.stats_summary()), flush=True)
        await sim.close()
    return 0


def main_in(argv: list[str]) -> int:
    """`extrabalance sim in [...]`: run until Ctrl-C / SIGTERM."""
    parser = build_in_parser()
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_run_in(args, parser))
    except (ValueError, OSError, KeyError) as exc:  # bad flag value, port in use, bad TOML key
        print(f"extrabalance sim in: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
