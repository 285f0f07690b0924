"""Issue 16: re-sends to the IN keep the End-to-End id (RFC 6733 §3, §5.5.4), also
after a restart, and the T flag is never set on a request's first transmission
(also when earlier attempts found no open peer, as while the connection redials)."""

from __future__ import annotations

import pytest

from extrabalance.adapters.in_diameter import DiameterInPort, InNodeAddress
from extrabalance.diameter import gy
from extrabalance.diameter.aio.node import NoPeerAvailable, RequestTimeout
from extrabalance.diameter.codec import Message
from extrabalance.service.ports import InAction, InOperation, InOutcome

IN_A = "in-a.operator.example"


class Wire:
    """Stands in for DiameterNode.request: records what would be sent."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.faults: list[type[Exception]] = []

    async def __call__(self, group: str, msg: Message) -> Message:
        if self.faults:
            fault = self.faults.pop(0)
            if fault is not NoPeerAvailable:
                self.sent.append(msg)
            raise fault("test")
        self.sent.append(msg)
        return gy.build_cca(msg, IN_A, "operator.example", 2001, currency_numeric=818,
                            currency_exponent=2)


def port(wire: Wire) -> DiameterInPort:
    return DiameterInPort(
        wire, {IN_A: InNodeAddress(IN_A, "operator.example", IN_A)},
        origin_host="eb.operator.example", origin_realm="operator.example",
        service_context_id="extrabalance@3gpp.org", currency_numeric=818, currency_exponent=2,
        transient_errors=(RequestTimeout, NoPeerAvailable), never_sent_errors=(NoPeerAvailable,))


def op(session_id: str, *, retransmission: bool = False, number: int = 0) -> InOperation:
    return InOperation(InAction.REFUND_ACCOUNT, "201001234567", IN_A, 500, session_id, number,
                       retransmission=retransmission)


async def test_every_resend_keeps_the_end_to_end_id_also_after_a_restart() -> None:
    wire = Wire()
    first = port(wire)
    sid = first.new_session_id()  # stored with the operation's intent
    wire.faults = [RequestTimeout]
    assert (await first.execute(op(sid))).outcome is InOutcome.UNKNOWN
    assert (await first.execute(op(sid, retransmission=True))).outcome is InOutcome.DONE
    restarted = port(wire)  # a new process: nothing in memory, the ledger's Session-Id
    assert (await restarted.execute(op(sid, retransmission=True))).outcome is InOutcome.DONE
    ids = {m.end_to_end_id for m in wire.sent}
    assert len(wire.sent) == 3 and len(ids) == 1 and 0 not in ids
    assert [m.is_retransmit for m in wire.sent] == [False, True, True]
    # Another operation gets another id.
    other = first.new_session_id()
    await first.execute(op(other))
    assert wire.sent[-1].end_to_end_id not in ids


async def test_no_t_flag_on_the_first_transmission_after_no_peer_was_open() -> None:
    wire = Wire()
    in_port = port(wire)
    sid = in_port.new_session_id()
    wire.faults = [NoPeerAvailable, NoPeerAvailable]  # the connection is being redialled
    assert (await in_port.execute(op(sid))).outcome is InOutcome.UNKNOWN
    assert (await in_port.execute(op(sid, retransmission=True))).outcome is InOutcome.UNKNOWN
    assert wire.sent == []
    await in_port.execute(op(sid, retransmission=True))  # the first that leaves
    await in_port.execute(op(sid, retransmission=True))  # a real re-send now
    assert [m.is_retransmit for m in wire.sent] == [False, True]
    assert wire.sent[0].end_to_end_id == wire.sent[1].end_to_end_id


@pytest.mark.parametrize("number", [0, 3])
async def test_an_operation_under_a_session_id_not_ours_keeps_its_id_in_this_process(
    number: int,
) -> None:
    wire = Wire()
    in_port = port(wire)
    for retransmission in (False, True, True):
        await in_port.execute(op(f"{IN_A};1;9", retransmission=retransmission, number=number))
    assert len({m.end_to_end_id for m in wire.sent}) == 1


async def test_a_resend_after_too_busy_carries_no_t_flag_but_after_a_timeout_it_does() -> None:
    """3004 / 3002: an answer was received and the request not executed, so its re-send
    later is not a possible duplicate (docs/protocols.md, RFC 6733 §7.1.3); once a send went
    unanswered, every later one is."""

    class Busy(Wire):
        def __init__(self, codes: list[int]) -> None:
            super().__init__()
            self.codes = codes

        async def __call__(self, group: str, msg: Message) -> Message:
            if self.codes:
                code = self.codes.pop(0)
                self.sent.append(msg)
                if code == 0:
                    raise RequestTimeout("test")
                return gy.build_cca(msg, IN_A, "operator.example", code,
                                    currency_numeric=818, currency_exponent=2)
            return await super().__call__(group, msg)

    wire = Busy([3004, 3002, 0, 3004])
    in_port = port(wire)
    sid = in_port.new_session_id()
    assert (await in_port.execute(op(sid))).outcome is InOutcome.NOT_EXECUTED
    for _ in range(4):
        await in_port.execute(op(sid, retransmission=True))
    assert [m.is_retransmit for m in wire.sent] == [False, False, False, True, True]
    assert len({m.end_to_end_id for m in wire.sent}) == 1
