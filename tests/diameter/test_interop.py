"""Cross-check with python-diameter (an independent implementation), both ways.

Their CCR/CCA/CER/DWR bytes are decoded by our codec and compared AVP for AVP;
our messages are decoded by theirs and read back through their API. (Their
re-encoding of a decoded message regenerates AVP flags from their own tables, so
byte equality is only checked in the other direction.) Their dictionary also
checks our AVP codes and types.
"""

from __future__ import annotations

import datetime
import ipaddress
import struct
from typing import Any

import pytest

from extrabalance.diameter import codec, gy
from extrabalance.diameter.codec import Avp, decode, encode
from extrabalance.diameter.dictionary import AVP_TABLE, AvpType, avp_def
from extrabalance.diameter.peer import LocalIdentity, PeerConnection, Role

from .helpers import sample_ccr

pd = pytest.importorskip("diameter.message", reason="python-diameter (dev dependency) missing")
from diameter.message import Message as TheirMessage
from diameter.message.avp import Avp as TheirAvp
from diameter.message.avp import AvpGrouped as TheirGrouped
from diameter.message.avp.dictionary import (
    AVP_DICTIONARY,
    AVP_VENDOR_DICTIONARY,
)
from diameter.message.avp.grouped import (
    CcMoney,
    GrantedServiceUnit,
    MultipleServicesCreditControl,
    RequestedServiceUnit,
    SubscriptionId,
    UnitValue,
)
from diameter.message.commands.capabilities_exchange import (
    CapabilitiesExchangeAnswer,
    CapabilitiesExchangeRequest,
)
from diameter.message.commands.credit_control import (
    CreditControlAnswer,
    CreditControlRequest,
)
from diameter.message.commands.device_watchdog import DeviceWatchdogRequest

STAMP = datetime.datetime(2026, 11, 25, 10, 15, tzinfo=datetime.UTC)


def _same_avp(theirs: TheirAvp, ours: Avp, path: str = "") -> None:
    where = f"{path}/{ours.name}"
    assert (theirs.code, theirs.vendor_id, theirs.flags) == (
        ours.code, ours.vendor_id, ours.flags), where
    entry = avp_def(ours.code, ours.vendor_id)
    kind = entry.type if entry else AvpType.OCTET_STRING
    if isinstance(theirs, TheirGrouped):
        assert kind is AvpType.GROUPED, where
        assert len(theirs.value) == len(ours.value), where
        for t, o in zip(theirs.value, ours.value, strict=True):
            _same_avp(t, o, where)
        return
    payload: bytes = theirs.payload
    if kind in (AvpType.UTF8_STRING, AvpType.DIAMETER_IDENTITY, AvpType.DIAMETER_URI):
        assert ours.value == payload.decode(), where
    elif kind in (AvpType.UNSIGNED32,):
        assert ours.value == struct.unpack(">I", payload)[0], where
    elif kind in (AvpType.INTEGER32, AvpType.ENUMERATED):
        assert ours.value == struct.unpack(">i", payload)[0], where
    elif kind is AvpType.INTEGER64:
        assert ours.value == struct.unpack(">q", payload)[0], where
    elif kind is AvpType.UNSIGNED64:
        assert ours.value == struct.unpack(">Q", payload)[0], where
    elif kind is AvpType.TIME:
        assert ours.value == codec.ntp_from_unix(theirs.value.timestamp()), where
    elif kind is AvpType.ADDRESS:
        assert ours.value == ipaddress.ip_address(theirs.value[1]), where
    else:
        assert ours.value == payload, where


def _same_message(theirs_bytes: bytes) -> codec.Message:
    theirs = TheirMessage.from_bytes(theirs_bytes)
    ours = decode(theirs_bytes)
    h = theirs.header
    assert (ours.command_code, ours.application_id, ours.hop_by_hop_id, ours.end_to_end_id) == (
        h.command_code, h.application_id, h.hop_by_hop_identifier, h.end_to_end_identifier)
    assert ours.flags == h.command_flags
    assert len(theirs.avps) == len(ours.avps)
    for t, o in zip(theirs.avps, ours.avps, strict=True):
        _same_avp(t, o)
    assert encode(ours) == theirs_bytes  # and we re-encode their bytes exactly
    return ours


def _their_ccr(mscc: bool) -> CreditControlRequest:
    ccr = CreditControlRequest()
    ccr.header.hop_by_hop_identifier = 0x10
    ccr.header.end_to_end_identifier = 0x20
    ccr.header.application_id = 4  # theirs defaults to 0, which we answer with 3007
    ccr.session_id = "in-a.operator.example;1;42"
    ccr.origin_host = b"in-a.operator.example"
    ccr.origin_realm = b"operator.example"
    ccr.destination_realm = b"node.example"
    ccr.auth_application_id = 4
    ccr.service_context_id = "extrabalance@3gpp.org"
    ccr.cc_request_type = 1
    ccr.cc_request_number = 0
    ccr.event_timestamp = STAMP
    ccr.subscription_id = [SubscriptionId(0, "201001234567")]
    money = CcMoney(UnitValue(2500, -2), 818)
    if mscc:
        ccr.multiple_services_indicator = 1
        ccr.multiple_services_credit_control = [MultipleServicesCreditControl(
            requested_service_unit=RequestedServiceUnit(cc_money=money), rating_group=1)]
    else:
        ccr.requested_service_unit = RequestedServiceUnit(cc_money=money)
    # a 3GPP vendor AVP too
    ccr.append_avp(TheirAvp.new(23, 10415, value=b"\x80\x00"))
    return ccr


@pytest.mark.parametrize("mscc", [False, True])
def test_their_ccr_decoded_by_ours(mscc: bool) -> None:
    ours = _same_message(_their_ccr(mscc).as_bytes())
    codec.validate(ours)
    parsed = gy.parse_ccr(ours)
    assert parsed.msisdn == "201001234567" and parsed.requested_minor == 2500
    assert parsed.has_mscc is mscc and parsed.request_type == 1
    assert parsed.event_timestamp == codec.ntp_from_unix(STAMP.timestamp())
    assert ours.get(23, vendor_id=10415) == b"\x80\x00"


def test_their_cca_decoded_by_ours() -> None:
    cca = CreditControlAnswer()
    cca.header.hop_by_hop_identifier = 1
    cca.header.end_to_end_identifier = 2
    cca.header.application_id = 4
    cca.session_id = "eb.node.example;1;1"
    cca.result_code = 2001
    cca.origin_host = b"in-a.operator.example"
    cca.origin_realm = b"operator.example"
    cca.auth_application_id = 4
    cca.cc_request_type = 4
    cca.cc_request_number = 0
    cca.granted_service_unit = GrantedServiceUnit(cc_money=CcMoney(UnitValue(1500, -2), 818))
    cca.check_balance_result = 0
    ours = _same_message(cca.as_bytes())
    codec.validate(ours)
    parsed = gy.parse_cca(ours)
    assert (parsed.result_code, parsed.granted_minor, parsed.check_balance_result) == (2001, 1500, 0)


def test_their_cer_cea_and_dwr_decoded_by_ours() -> None:
    cer = CapabilitiesExchangeRequest()
    cer.origin_host = b"in-a.operator.example"
    cer.origin_realm = b"operator.example"
    cer.host_ip_address = ["10.1.2.3", "2001:db8::1"]
    cer.vendor_id = 10415
    cer.product_name = "python-diameter"
    cer.origin_state_id = 9
    cer.auth_application_id = [4]
    cer.supported_vendor_id = [10415]
    ours = _same_message(cer.as_bytes())
    codec.validate(ours)
    assert [a.value for a in ours.all(257)] == [ipaddress.ip_address("10.1.2.3"),
                                                ipaddress.ip_address("2001:db8::1")]
    # our responder accepts it
    server = PeerConnection(LocalIdentity("eb.node.example", "node.example"), Role.RESPONDER,
                            allowed_peers={"in-a.operator.example"})
    server.connection_made(0.0)
    server.data_received(cer.as_bytes(), 0.0)
    assert decode(server.data_to_send()).get(268) == 2001

    cea = CapabilitiesExchangeAnswer()
    cea.result_code = 2001
    cea.origin_host = b"in-a.operator.example"
    cea.origin_realm = b"operator.example"
    cea.host_ip_address = ["10.1.2.3"]
    cea.vendor_id = 0
    cea.product_name = "python-diameter"
    cea.auth_application_id = [4]
    codec.validate(_same_message(cea.as_bytes()))

    dwr = DeviceWatchdogRequest()
    dwr.origin_host = b"in-a.operator.example"
    dwr.origin_realm = b"operator.example"
    dwr.origin_state_id = 9
    codec.validate(_same_message(dwr.as_bytes()))


def test_our_ccr_decoded_by_theirs() -> None:
    ours = encode(sample_ccr())
    theirs: Any = TheirMessage.from_bytes(ours)
    assert isinstance(theirs, CreditControlRequest)
    assert theirs.session_id == "eb.node.example;1700000000;1"
    assert theirs.origin_host == b"eb.node.example"
    assert theirs.destination_host == b"in-a.operator.example"
    assert (theirs.auth_application_id, theirs.cc_request_type, theirs.cc_request_number) == (
        4, 4, 0)
    assert theirs.requested_action == 1
    assert theirs.subscription_id[0].subscription_id_type == 0
    assert theirs.subscription_id[0].subscription_id_data == "201001234567"
    money = theirs.requested_service_unit.cc_money
    assert (money.unit_value.value_digits, money.unit_value.exponent, money.currency_code) == (
        1000, -2, 818)
    expected = datetime.datetime.fromtimestamp(codec.unix_from_ntp(3_973_000_000))
    assert theirs.event_timestamp == expected
    assert theirs.header.is_request and theirs.header.is_proxyable


def test_our_cca_decoded_by_theirs() -> None:
    cca = gy.build_cca(sample_ccr(has_mscc=True), "in-a.operator.example", "operator.example",
                       2001, granted_minor=500, currency_numeric=818, currency_exponent=2)
    ours = encode(cca)
    theirs: Any = TheirMessage.from_bytes(ours)
    assert isinstance(theirs, CreditControlAnswer)
    assert theirs.result_code == 2001
    gsu = theirs.multiple_services_credit_control[0].granted_service_unit
    assert gsu.cc_money.unit_value.value_digits == 500
    error = encode(gy.build_cca(sample_ccr(), "in", "r", 3004, currency_numeric=818,
                                currency_exponent=2))
    assert TheirMessage.from_bytes(error).header.is_error


def test_our_cer_and_dwr_decoded_by_theirs() -> None:
    client = PeerConnection(LocalIdentity("eb.node.example", "node.example", vendor_id=0,
                                          origin_state_id=5), Role.INITIATOR)
    client.start(0.0)
    client.connection_made(0.0)
    cer_bytes = client.data_to_send()
    cer: Any = TheirMessage.from_bytes(cer_bytes)
    assert isinstance(cer, CapabilitiesExchangeRequest)
    assert cer.origin_host == b"eb.node.example" and cer.host_ip_address == [(1, "127.0.0.1")]
    assert cer.auth_application_id == [4] and cer.product_name == "ExtraBalance"
    assert cer.origin_state_id == 5 and not cer.header.is_proxyable
    dwr = encode(codec.request(280, 0, [codec.avp(264, "eb"), codec.avp(296, "r")],
                               proxiable=False))
    assert TheirMessage.from_bytes(dwr).origin_host == b"eb"


# RFC 6733 §4.5 types these Unsigned32; python-diameter reads them as Integer32
# (same four bytes on the wire below 2^31).
THEIR_SIGNED_UNSIGNED32 = {"Result-Code", "Session-Binding", "Authorization-Lifetime",
                           "Inband-Security-Id"}


def test_dictionary_agrees_with_theirs() -> None:
    their_type = {
        AvpType.OCTET_STRING: "AvpOctetString", AvpType.INTEGER32: "AvpInteger32",
        AvpType.INTEGER64: "AvpInteger64", AvpType.UNSIGNED32: "AvpUnsigned32",
        AvpType.UNSIGNED64: "AvpUnsigned64", AvpType.GROUPED: "AvpGrouped",
        AvpType.ADDRESS: "AvpAddress", AvpType.TIME: "AvpTime",
        AvpType.UTF8_STRING: "AvpUtf8String",
        # They store these derived types as their base types.
        AvpType.DIAMETER_IDENTITY: "AvpOctetString", AvpType.ENUMERATED: "AvpInteger32",
        AvpType.IP_FILTER_RULE: "AvpOctetString",
    }
    uri_ok = {"AvpOctetString", "AvpUtf8String"}
    checked = 0
    for code, name, typ, _m, vendor in AVP_TABLE:
        entry = AVP_DICTIONARY.get(code) if vendor == 0 else \
            AVP_VENDOR_DICTIONARY.get(vendor, {}).get(code)
        assert entry is not None, name
        got = entry["type"].__name__
        if typ is AvpType.DIAMETER_URI:
            assert got in uri_ok, name
        elif name in THEIR_SIGNED_UNSIGNED32:
            assert got == "AvpInteger32", name
        else:
            assert got == their_type[typ], name
        checked += 1
    assert checked == len(AVP_TABLE)
