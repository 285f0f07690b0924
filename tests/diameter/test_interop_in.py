"""Issue 16: an IN built on a Diameter implementation this project did not write.

python-diameter (a dev dependency) runs the prepaid IN as its own Diameter node
(its CER/CEA, DWR/DWA, routing and threads), written from RFC 4006 alone: a grant
in a CCA is a credit, a REFUND_ACCOUNT is a credit, a DIRECT_DEBITING a debit, each
(Session-Id, CC-Request-Number) executed once. Our node dials it, and the three
money paths run over that connection with our real Diameter stack, IN port, Gy
server and services: an automatic advance (the IN's out-of-balance CCR), a loan
credit and a payback debit. Asserted: one credit per advance and per loan, the
debit of what is owed, the ledger and the IN agree, and byte-level agreement
(every message python-diameter sent is re-encoded by our codec to the same bytes;
every CCR we sent is read back through python-diameter's API field for field).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest

from extrabalance.adapters.gy_server import GyServer
from extrabalance.adapters.in_diameter import DiameterInPort, InNodeAddress
from extrabalance.diameter import codec
from extrabalance.diameter.aio.node import (
    DiameterNode,
    LocalIdentity,
    NoPeerAvailable,
    PeerAddress,
    RequestTimeout,
)
from extrabalance.service.ports import RechargeEvent
from tests.service.fakes import Harness

pytest.importorskip("diameter.node", reason="python-diameter (dev dependency) missing")
from diameter.message import Message as TheirMessage
from diameter.message.avp.grouped import CcMoney, GrantedServiceUnit, SubscriptionId, UnitValue
from diameter.message.commands.credit_control import CreditControlRequest
from diameter.node import Node as TheirNode
from diameter.node.application import SimpleThreadingApplication

NODE_HOST, IN_HOST, REALM = "eb.operator.example", "in-a.operator.example", "operator.example"
M = "201001234567"  # served by IN_HOST in the harness's routes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RfcOnlyIn:
    """The IN's books, kept by python-diameter's request handler thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.balances: dict[str, int] = {}
        self.answers: dict[tuple[str, int], Any] = {}
        self.credits: list[tuple[str, str, int]] = []  # (kind, Session-Id, amount)
        self.debits: list[tuple[str, int]] = []
        self.sent: list[bytes] = []  # every message this IN's application sent
        self.received: list[Any] = []  # our CCRs, as python-diameter read them

    def handle(self, app: Any, request: Any) -> Any:
        with self.lock:
            self.received.append(request)
            key = (request.session_id, request.cc_request_number)
            answer = app.generate_answer(request)
            answer.cc_request_type = request.cc_request_type
            answer.cc_request_number = request.cc_request_number
            if key not in self.answers:
                msisdn = request.subscription_id[0].subscription_id_data
                money = request.requested_service_unit.cc_money
                amount = money.unit_value.value_digits * 10 ** (money.unit_value.exponent + 2)
                balance = self.balances.get(msisdn, 0)
                if request.requested_action == 1:  # REFUND_ACCOUNT: a credit of its own
                    self.balances[msisdn] = balance + amount
                    self.credits.append(("REFUND_ACCOUNT", request.session_id, amount))
                    self.answers[key] = (2001, None)
                elif request.requested_action == 0 and balance >= amount:  # DIRECT_DEBITING
                    self.balances[msisdn] = balance - amount
                    self.debits.append((request.session_id, amount))
                    self.answers[key] = (2001, amount)
                else:
                    self.answers[key] = (4012, None)
            result, granted = self.answers[key]
            answer.result_code = result
            if granted is not None:
                answer.granted_service_unit = GrantedServiceUnit(
                    cc_money=CcMoney(UnitValue(granted, -2), 818))
            self.sent.append(answer.as_bytes())
            return answer

    def apply_grant(self, session_id: str, msisdn: str, amount: int) -> None:
        with self.lock:
            self.balances[msisdn] = self.balances.get(msisdn, 0) + amount
            self.credits.append(("GRANT", session_id, amount))


def out_of_balance_ccr(session_id: str) -> Any:
    ccr = CreditControlRequest()
    ccr.header.application_id = 4
    ccr.session_id = session_id
    ccr.origin_host = IN_HOST.encode()
    ccr.origin_realm = REALM.encode()
    ccr.destination_realm = REALM.encode()
    ccr.destination_host = NODE_HOST.encode()
    ccr.auth_application_id = 4
    ccr.service_context_id = "extrabalance@3gpp.org"
    ccr.cc_request_type = 1
    ccr.cc_request_number = 0
    ccr.subscription_id = [SubscriptionId(0, M)]
    return ccr


@pytest.fixture
async def network(tmp_path: Any) -> Any:
    book = RfcOnlyIn()
    in_port_number = free_port()
    theirs = TheirNode(IN_HOST, REALM, ip_addresses=["127.0.0.1"], tcp_port=in_port_number,
                       vendor_ids=[0, 10415])
    # Its connection thread wakes this often, and its stop waits for that wake-up (up to
    # 7 s at the library's default of 6); peer timers are not what these tests look at.
    theirs.wakeup_interval = 1
    our_peer = theirs.add_peer(f"aaa://{NODE_HOST}", REALM)
    app = SimpleThreadingApplication(4, is_auth_application=True, request_handler=book.handle)
    theirs.add_application(app, [our_peer])
    theirs.start()

    gy_server: list[GyServer] = []

    async def handler(msg: codec.Message, peer: str) -> codec.Message:
        return await gy_server[0](msg, peer)

    ours = DiameterNode(LocalIdentity(NODE_HOST, REALM), allowed_peers={IN_HOST},
                        request_handler=handler, request_timeout_ms=5000)
    ours.add_peer_group(IN_HOST, REALM, [PeerAddress("127.0.0.1", in_port_number, IN_HOST)])
    in_port = DiameterInPort(
        ours.request, {IN_HOST: InNodeAddress(IN_HOST, REALM, IN_HOST)},
        origin_host=NODE_HOST, origin_realm=REALM, service_context_id="extrabalance@3gpp.org",
        currency_numeric=818, currency_exponent=2,
        transient_errors=(RequestTimeout, NoPeerAvailable), never_sent_errors=(NoPeerAvailable,),
        end_to_end_ids=ours.new_end_to_end_id)
    h = Harness(tmp_path / "ledger.db", fake_in=in_port)  # type: ignore[arg-type]
    gy_server.append(GyServer(h.lending, origin_host=NODE_HOST, origin_realm=REALM,
                              service_context_id="extrabalance@3gpp.org", currency_numeric=818,
                              currency_exponent=2, answer_deadline_ms=5000))
    try:
        await ours.wait_ready(IN_HOST, 10)
        await asyncio.to_thread(app.wait_for_ready, 10)
        yield h, app, book
    finally:
        await h.close()
        await ours.close()
        await asyncio.to_thread(theirs.stop, 5, True)


async def test_money_paths_against_a_python_diameter_in(network: Any) -> None:
    h, app, book = network
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)

    # 1. The automatic advance: their CCR, our CCA; the grant is the credit.
    session = f"{IN_HOST};1;1"
    cca = await asyncio.to_thread(app.send_request, out_of_balance_ccr(session), 10)
    book.sent.append(out_of_balance_ccr(session).as_bytes())
    assert cca.result_code == 2001
    granted = cca.granted_service_unit.cc_money.unit_value
    assert (granted.value_digits, granted.exponent) == (500, -2)
    book.apply_grant(session, M, 500)
    # 2. A loan: our REFUND_ACCOUNT, their CCA.
    loan = await h.lending.borrow(M, 4, "ussd", "k1")
    assert loan.status.value == "GRANTED"
    # 3. A recharge of 5000 at the IN, then our DIRECT_DEBITING of what is owed
    # (advance 500 + 50, loan 1000 + 100).
    with book.lock:
        book.balances[M] += 5000
        after = book.balances[M]
    payback = await h.payback.handle_recharge(RechargeEvent("e1", M, 5000, IN_HOST, after))
    assert payback.recovered_minor == 1650 and payback.debt_minor == 0

    # One credit per advance and per loan, nothing else; the debit of what was owed.
    assert [kind for kind, _, _ in book.credits] == ["GRANT", "REFUND_ACCOUNT"]
    assert [amount for _, _, amount in book.credits] == [500, 1000]
    assert [amount for _, amount in book.debits] == [1650]
    assert book.balances[M] == 500 + 1000 + 5000 - 1650
    assert all(not s.startswith(IN_HOST) for kind, s, _ in book.credits if kind != "GRANT")
    assert (await h.check_invariants())["debts"] == {M: 0}

    # Byte-level agreement: whatever python-diameter sent, our codec reproduces.
    assert len(book.sent) == 3
    for data in book.sent:
        ours = codec.decode(data)
        assert codec.encode(ours) == data
        codec.validate(ours)
    # ... and our CCRs, read through their API, carry what we meant.
    actions = [(r.requested_action, r.cc_request_type, r.cc_request_number,
                r.requested_service_unit.cc_money.unit_value.value_digits,
                r.header.is_retransmit) for r in book.received]
    assert actions == [(1, 4, 0, 1000, False), (0, 4, 0, 1650, False)]
    for request in book.received:
        assert request.destination_host == IN_HOST.encode()
        again = TheirMessage.from_bytes(request.as_bytes())
        assert again.session_id == request.session_id
