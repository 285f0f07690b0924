"""Stateful fuzzing of an ESME session and an SMSC session wired together.

Random interleavings of submits, delivers, answers, partial byte delivery, garbage
and time. Invariants: the window and queue bounds hold, nothing but the documented
exceptions escapes, and every request is resolved exactly once (a response or a
failure), including when the connection is finally lost.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from extrabalance.smpp.pdu import DeliverSm, Pdu, SubmitSm, make_response
from extrabalance.smpp.session import (
    BindRefused,
    Bound,
    LateResponse,
    LinkDead,
    ProtocolViolation,
    QueueFull,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
    Role,
    Session,
    SessionStateError,
    Unbound,
)

WINDOW, QUEUE, INBOUND = 3, 4, 5


class SessionPair(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        kw = {"window_max": WINDOW, "queue_max": QUEUE, "inbound_pending_max": INBOUND,
                  "response_timeout_s": 5.0, "enquire_link_s": 7.0}
        self.sides = {
            "esme": Session(Role.ESME, **kw),  # type: ignore[arg-type]
            "smsc": Session(Role.SMSC, system_id="S", authenticator=lambda p: 0, **kw),  # type: ignore[arg-type]
        }
        self.now = 0.0
        self.unresolved: dict[str, set[int]] = {"esme": set(), "smsc": set()}
        self.inbound: dict[str, list[Pdu]] = {"esme": [], "smsc": []}
        self.wire: dict[str, bytes] = {"esme": b"", "smsc": b""}  # bytes in flight *to* side
        self.sides["esme"].bind("trx", "n", "p", now_s=0.0)
        self._move("smsc", 10_000)
        self._move("esme", 10_000)

    def _events(self, side: str, events: list[object]) -> None:
        for ev in events:
            assert isinstance(ev, (Bound, BindRefused, RequestReceived, ResponseReceived,
                                   RequestFailed, LateResponse, Unbound, LinkDead,
                                   ProtocolViolation))
            if isinstance(ev, (ResponseReceived, RequestFailed)):
                seq = ev.request.sequence_number
                assert seq in self.unresolved[side], f"{side}: {seq} resolved twice"
                self.unresolved[side].discard(seq)
            elif isinstance(ev, RequestReceived):
                self.inbound[side].append(ev.pdu)

    def _collect(self) -> None:
        for name, other in (("esme", "smsc"), ("smsc", "esme")):
            self.wire[other] += self.sides[name].data_to_send()

    def _move(self, to: str, octets: int) -> None:
        self._collect()
        chunk, self.wire[to] = self.wire[to][:octets], self.wire[to][octets:]
        if chunk:
            self._events(to, self.sides[to].receive_data(chunk, self.now))
        self._collect()

    def _send(self, side: str, pdu: Pdu) -> None:
        try:
            seq = self.sides[side].send_request(pdu, self.now)
        except (QueueFull, SessionStateError):
            return
        self.unresolved[side].add(seq)

    @rule()
    def esme_submits(self) -> None:
        self._send("esme", SubmitSm(destination_addr="1"))

    @rule()
    def smsc_delivers(self) -> None:
        self._send("smsc", DeliverSm(source_addr="2"))

    @rule(to=st.sampled_from(["esme", "smsc"]), octets=st.integers(1, 300))
    def bytes_arrive(self, to: str, octets: int) -> None:
        self._move(to, octets)

    @rule(side=st.sampled_from(["esme", "smsc"]), status=st.sampled_from([0, 0, 0x58, 0x14, 0x45]),
          index=st.integers(0, 10))
    def answer(self, side: str, status: int, index: int) -> None:
        pending = self.inbound[side]
        if pending:
            pdu = pending.pop(index % len(pending))
            self.sides[side].send_response(make_response(pdu, status))

    @rule(to=st.sampled_from(["esme", "smsc"]), junk=st.binary(min_size=1, max_size=40))
    def garbage(self, to: str, junk: bytes) -> None:
        # Only between whole PDUs, like a peer with a codec bug (not a TCP corruption).
        self._move(to, 1 << 30)
        self._events(to, self.sides[to].receive_data(junk, self.now))

    @rule(seconds=st.floats(0.0, 4.0))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        for name in ("esme", "smsc"):
            self._events(name, self.sides[name].tick(self.now))
        self._collect()

    @invariant()
    def bounds_hold(self) -> None:
        for s in self.sides.values():
            assert 0 <= s.window_used <= WINDOW
            assert 0 <= s.queued <= QUEUE

    def teardown(self) -> None:
        for name, s in self.sides.items():
            self._events(name, s.connection_lost())
            assert not self.unresolved[name], f"{name}: never resolved {self.unresolved[name]}"


SessionPair.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestSessionPair = SessionPair.TestCase
