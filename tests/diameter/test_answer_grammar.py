"""Issue 16: the answers an IN built to RFC 6733 / RFC 4006 alone expects.

* a 5xxx answer (E bit clear) is a CCA: Auth-Application-Id, CC-Request-Type and
  CC-Request-Number (RFC 4006 §3.2); only 3xxx answers are the generic
  answer-message with the E bit (RFC 6733 §7.2);
* a CCR for another Destination-Realm gets 3003, for another Destination-Host 3002
  (RFC 6733 §6.1, §7.1.3), and the lending service never sees it;
* a Requested-Service-Unit with CC-Time only gets 5031 and no grant (RFC 4006 §8.18:
  a grant only in the unit asked for);
* every one of these answers passes our own answer validation and is read by tshark
  with no malformation and no warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extrabalance.adapters.gy_server import GyServer
from extrabalance.diameter import codec, gy
from extrabalance.diameter.codec import Message, avp
from extrabalance.diameter.constants import (
    AVP_CC_MONEY,
    AVP_CC_REQUEST_NUMBER,
    AVP_CC_REQUEST_TYPE,
    AVP_CC_TIME,
    AVP_REQUESTED_SERVICE_UNIT,
    AVP_SUBSCRIPTION_ID,
)
from extrabalance.service.outcomes import AdvanceDecision, AdvanceOutcome

from .helpers import sample_ccr
from .test_wire import expert_lines, needs_tshark, tshark_problems, write_pcap

NODE_HOST = "eb.operator.example"
NODE_REALM = "operator.example"


class CountingLending:
    def __init__(self) -> None:
        self.calls = 0

    async def out_of_balance(self, *args: Any, **kwargs: Any) -> AdvanceOutcome:
        self.calls += 1
        return AdvanceOutcome(AdvanceDecision.ADVANCED, 500)


def server(lending: CountingLending) -> GyServer:
    return GyServer(lending, origin_host=NODE_HOST, origin_realm=NODE_REALM,
                    service_context_id="extrabalance@3gpp.org", currency_numeric=818,
                    currency_exponent=2)


def oob_ccr(**changes: object) -> Message:
    fields: dict[str, object] = {
        "session_id": "in-a.operator.example;1;7", "origin_host": "in-a.operator.example",
        "origin_realm": NODE_REALM, "destination_realm": NODE_REALM,
        "destination_host": NODE_HOST, "request_type": gy.INITIAL_REQUEST,
        "request_number": 0, "requested_action": None, "requested_minor": None,
        "currency_numeric": None,
    }
    fields.update(changes)
    return sample_ccr(**fields)


def with_cc_time_only(msg: Message) -> Message:
    rsu = avp(AVP_REQUESTED_SERVICE_UNIT, (avp(AVP_CC_TIME, 300),))
    return msg._replace(avps=(*msg.avps, rsu))


def assert_cca_grammar(answer: Message, request: Message) -> None:
    """A CCA per RFC 4006 §3.2 (validated against the dictionary's CCA grammar), or a
    3xxx with the E bit."""
    code = answer.get(268)
    if 3000 <= code < 4000:
        assert answer.is_error
    else:
        assert not answer.is_error
        assert answer.get(258) == 4
        assert answer.get(AVP_CC_REQUEST_TYPE) == request.get(AVP_CC_REQUEST_TYPE)
        assert answer.get(AVP_CC_REQUEST_NUMBER) == request.get(AVP_CC_REQUEST_NUMBER)
    codec.validate(codec.decode(codec.encode(answer)))


async def test_a_5xxx_error_answer_to_a_ccr_is_a_cca() -> None:
    lending = CountingLending()
    request = oob_ccr(request_number=3, request_type=gy.UPDATE_REQUEST)
    no_sub = request._replace(avps=tuple(a for a in request.avps if a.code != AVP_SUBSCRIPTION_ID))
    answer = await server(lending)(no_sub, "in-a.operator.example")
    assert answer.get(268) == 5005 and lending.calls == 0
    assert_cca_grammar(answer, request)
    # The same for a 5xxx the codec raises before any handler (here: 5004).
    bad_type = request._replace(avps=tuple(
        avp(AVP_CC_REQUEST_TYPE, 9) if a.code == AVP_CC_REQUEST_TYPE else a
        for a in request.avps))
    answer = await server(lending)(bad_type, "in-a.operator.example")
    assert answer.get(268) == 5004 and answer.get(AVP_CC_REQUEST_TYPE) == 9
    assert answer.get(258) == 4 and answer.get(AVP_CC_REQUEST_NUMBER) == 3


@pytest.mark.parametrize(("changes", "code"), [
    ({"destination_realm": "elsewhere.example"}, 3003),
    ({"destination_host": "other-node.operator.example"}, 3002),
])
async def test_a_request_for_another_realm_or_host_is_not_executed(
    changes: dict[str, str], code: int,
) -> None:
    lending = CountingLending()
    request = oob_ccr(**changes)
    answer = await server(lending)(request, "in-a.operator.example")
    assert (answer.get(268), answer.is_error, lending.calls) == (code, True, 0)
    assert_cca_grammar(answer, request)


async def test_our_host_and_realm_in_any_case_are_served() -> None:
    lending = CountingLending()
    request = oob_ccr(destination_realm=NODE_REALM.upper(), destination_host=NODE_HOST.upper())
    answer = await server(lending)(request, "in-a.operator.example")
    assert answer.get(268) == 2001 and lending.calls == 1


async def test_cc_time_only_gets_no_money_grant() -> None:
    lending = CountingLending()
    request = with_cc_time_only(oob_ccr())
    answer = await server(lending)(request, "in-a.operator.example")
    assert answer.get(268) == 5031 and lending.calls == 0
    assert answer.first(431) is None  # no Granted-Service-Unit
    assert_cca_grammar(answer, request)
    # Money asked for (with time beside it) is served as before.
    money = oob_ccr(requested_minor=500, currency_numeric=818)
    assert (await server(lending)(money, "in-a.operator.example")).get(268) == 2001
    assert money.path(AVP_REQUESTED_SERVICE_UNIT, AVP_CC_MONEY) is not None


def answers_for_the_wire() -> list[tuple[bool, bytes]]:
    import asyncio

    async def collect() -> list[tuple[bool, bytes]]:
        lending = CountingLending()
        gy_server = server(lending)
        out: list[tuple[bool, bytes]] = []
        base = oob_ccr(request_number=2, request_type=gy.UPDATE_REQUEST)
        requests = [
            base._replace(avps=tuple(a for a in base.avps if a.code != AVP_SUBSCRIPTION_ID)),
            oob_ccr(destination_realm="elsewhere.example"),
            oob_ccr(destination_host="other-node.operator.example"),
            with_cc_time_only(oob_ccr()),
            oob_ccr(service_context_id="other@3gpp.org"),
        ]
        for i, request in enumerate(requests):
            request = request._replace(hop_by_hop_id=100 + i, end_to_end_id=200 + i)
            out.append((True, codec.encode(request)))
            out.append((False, codec.encode(await gy_server(request, "in-a.operator.example"))))
        return out

    return asyncio.run(collect())


@needs_tshark
def test_tshark_reads_these_answers_cleanly(tmp_path: Path) -> None:
    pcap = tmp_path / "answers.pcap"
    write_pcap(pcap, answers_for_the_wire())
    text, problems = tshark_problems(pcap)
    assert not problems, problems
    assert not expert_lines(pcap), expert_lines(pcap)
    for name in ("DIAMETER_MISSING_AVP (5005)", "DIAMETER_REALM_NOT_SERVED (3003)",
                 "DIAMETER_UNABLE_TO_DELIVER (3002)", "DIAMETER_RATING_FAILED (5031)"):
        assert f"Result-Code: {name}" in text, name
    assert text.count("CC-Request-Type: UPDATE_REQUEST (2)") >= 2  # the 5005 CCA echoes it
