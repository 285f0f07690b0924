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
  Origin-Host and listening port, serving PROTOCOLS.md "Node → IN" and sending
  PROTOCOLS.md "IN → node" out-of-balance requests as a client; recharges published
  on MQTT through `simulators.recharge_publisher`.
* The `extrabalance sim in` entry point (`main_in`).

Exactly-once, as the node relies on it
--------------------------------------
The key of an operation is (Session-Id, CC-Request-Number). The first request with a
key is executed and its answer stored; every later request with that key, with or
without the T flag, gets the stored answer and changes nothing. Two answers are
deliberately NOT stored: 3002 UNABLE_TO_DELIVER and 3004 TOO_BUSY say "not executed",
and the node re-sends the same key without the T flag expecting it to be executed
then (RFC 6733 §7.1.3, PROTOCOLS.md). A dropped answer IS stored: the operation was
applied and only the answer was lost, the case that makes retries dangerous.

The pure part (ranges, accounts, faults) does no IO and is tested without sockets;
the simulator never imports the node's application, domain or ledger code.
"""

from __future__ import annotations

import enum
import random
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# --- Result codes this simulator answers with (RFC 6733 §7.1, RFC 4006 §9) ---------
DIAMETER_SUCCESS = 2001
DIAMETER_UNABLE_TO_DELIVER = 3002
DIAMETER_TOO_BUSY = 3004
DIAMETER_END_USER_SERVICE_DENIED = 4010
DIAMETER_CREDIT_LIMIT_REACHED = 4012
DIAMETER_USER_UNKNOWN = 5030

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


@dataclass(frozen=True, slots=True)
class OpAnswer:
    result_code: int
    granted_minor: int | None = None  # DIRECT_DEBITING: what was debited
    check_balance_result: CheckBalanceResult | None = None


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
    ) -> None:
        if answers_max < 1:
            raise ValueError("answers_max must be positive")
        self.spec = spec
        self.initial_balance_minor = initial_balance_minor
        self._answers_max = answers_max
        self._balances: dict[str, int] = {}
        self._answers: OrderedDict[tuple[str, int], tuple[BalanceOp, OpAnswer]] = OrderedDict()
        self._ledger: deque[AppliedOp] = ledger if ledger is not None else deque(maxlen=APPLIED_MAX)
        self.stats: dict[str, int] = {
            "executed": 0,
            "duplicates": 0,
            "duplicate_mismatch": 0,  # same key, different content: a bug in the client
            "answers_evicted": 0,
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
            answer.result_code,
        )
        return answer, False

    def _apply(self, op: BalanceOp) -> OpAnswer:
        balance = self.balance(op.msisdn)
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
        self, ref: str, number: int, kind: str, msisdn: str, amount_minor: int, result: int
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


def plan_faults(faults: InFaults, rng: random.Random, msisdn: str) -> FaultPlan:
    """Draw the faults for one request (pure given the random generator)."""
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
