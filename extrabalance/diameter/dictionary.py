"""The Diameter dictionary: one data table that the codec, the validator and the
pretty-printer all read.

This file owns every fact we know about the protocol's vocabulary:

* ``AVP_TABLE``: (code, name, data type, M-flag rule, vendor) for every AVP we
  understand — RFC 6733 base, RFC 4006/8506 credit control, a modest set of 3GPP
  TS 32.299 Gy AVPs (vendor 10415). The V flag rule follows from the vendor: an AVP
  with a vendor id MUST carry V, an IETF AVP (vendor 0) MUST NOT.
* ``COMMAND_TABLE``, ``RESULT_CODE_TABLE``, ``APPLICATION_TABLE``: command codes,
  result codes, application ids.
* ``COMMAND_GRAMMAR`` / ``GROUPED_GRAMMAR``: the parts of the RFC ABNF the validator
  enforces (which AVPs are required, which may occur at most once, the P bit rule).

The named constants in ``constants.py`` are generated from these tables
(``python -m extrabalance.diameter.dictionary > extrabalance/diameter/constants.py``);
a test checks the generated file is current. Codes and types are cross-checked in
the tests against the independent python-diameter dictionary.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final


class AvpType(enum.IntEnum):
    """RFC 6733 §4.2/§4.3 data formats (Enumerated and Time are derived formats)."""

    OCTET_STRING = 1
    INTEGER32 = 2
    INTEGER64 = 3
    UNSIGNED32 = 4
    UNSIGNED64 = 5
    FLOAT32 = 6
    FLOAT64 = 7
    GROUPED = 8
    ADDRESS = 9
    TIME = 10
    UTF8_STRING = 11
    DIAMETER_IDENTITY = 12
    DIAMETER_URI = 13
    ENUMERATED = 14
    IP_FILTER_RULE = 15


class FlagRule(enum.IntEnum):
    """What the AVP table of the defining RFC says about the M bit."""

    MUST = 1
    MAY = 2
    MUST_NOT = 3


VENDOR_IETF: Final = 0
VENDOR_3GPP: Final = 10415

# Shorthands so the table below reads like the RFC tables.
_OS, _I32, _I64, _U32, _U64 = (
    AvpType.OCTET_STRING,
    AvpType.INTEGER32,
    AvpType.INTEGER64,
    AvpType.UNSIGNED32,
    AvpType.UNSIGNED64,
)
_F32, _F64, _GRP, _ADDR, _TIME = (
    AvpType.FLOAT32,
    AvpType.FLOAT64,
    AvpType.GROUPED,
    AvpType.ADDRESS,
    AvpType.TIME,
)
_UTF8, _IDENT, _URI, _ENUM, _IPF = (
    AvpType.UTF8_STRING,
    AvpType.DIAMETER_IDENTITY,
    AvpType.DIAMETER_URI,
    AvpType.ENUMERATED,
    AvpType.IP_FILTER_RULE,
)
_M, _MAY, _NO = FlagRule.MUST, FlagRule.MAY, FlagRule.MUST_NOT
_3G = VENDOR_3GPP

# (code, name, type, M rule, vendor)
AVP_TABLE: Final[tuple[tuple[int, str, AvpType, FlagRule, int], ...]] = (
    # --- RFC 6733 base protocol (§4.5 table) -------------------------------------
    (1, "User-Name", _UTF8, _M, 0),
    (25, "Class", _OS, _M, 0),
    (27, "Session-Timeout", _U32, _M, 0),
    (33, "Proxy-State", _OS, _M, 0),
    (44, "Acct-Session-Id", _OS, _M, 0),
    (50, "Acct-Multi-Session-Id", _UTF8, _M, 0),
    (55, "Event-Timestamp", _TIME, _M, 0),
    (85, "Acct-Interim-Interval", _U32, _M, 0),
    (257, "Host-IP-Address", _ADDR, _M, 0),
    (258, "Auth-Application-Id", _U32, _M, 0),
    (259, "Acct-Application-Id", _U32, _M, 0),
    (260, "Vendor-Specific-Application-Id", _GRP, _M, 0),
    (261, "Redirect-Host-Usage", _ENUM, _M, 0),
    (262, "Redirect-Max-Cache-Time", _U32, _M, 0),
    (263, "Session-Id", _UTF8, _M, 0),
    (264, "Origin-Host", _IDENT, _M, 0),
    (265, "Supported-Vendor-Id", _U32, _M, 0),
    (266, "Vendor-Id", _U32, _M, 0),
    (267, "Firmware-Revision", _U32, _NO, 0),
    (268, "Result-Code", _U32, _M, 0),
    (269, "Product-Name", _UTF8, _NO, 0),
    (270, "Session-Binding", _U32, _M, 0),
    (271, "Session-Server-Failover", _ENUM, _M, 0),
    (272, "Multi-Round-Time-Out", _U32, _M, 0),
    (273, "Disconnect-Cause", _ENUM, _M, 0),
    (274, "Auth-Request-Type", _ENUM, _M, 0),
    (276, "Auth-Grace-Period", _U32, _M, 0),
    (277, "Auth-Session-State", _ENUM, _M, 0),
    (278, "Origin-State-Id", _U32, _M, 0),
    (279, "Failed-AVP", _GRP, _M, 0),
    (280, "Proxy-Host", _IDENT, _M, 0),
    (281, "Error-Message", _UTF8, _NO, 0),
    (282, "Route-Record", _IDENT, _M, 0),
    (283, "Destination-Realm", _IDENT, _M, 0),
    (284, "Proxy-Info", _GRP, _M, 0),
    (285, "Re-Auth-Request-Type", _ENUM, _M, 0),
    (287, "Accounting-Sub-Session-Id", _U64, _M, 0),
    (291, "Authorization-Lifetime", _U32, _M, 0),
    (292, "Redirect-Host", _URI, _M, 0),
    (293, "Destination-Host", _IDENT, _M, 0),
    (294, "Error-Reporting-Host", _IDENT, _NO, 0),
    (295, "Termination-Cause", _ENUM, _M, 0),
    (296, "Origin-Realm", _IDENT, _M, 0),
    (297, "Experimental-Result", _GRP, _M, 0),
    (298, "Experimental-Result-Code", _U32, _M, 0),
    (299, "Inband-Security-Id", _U32, _M, 0),
    (480, "Accounting-Record-Type", _ENUM, _M, 0),
    (483, "Accounting-Realtime-Required", _ENUM, _M, 0),
    (485, "Accounting-Record-Number", _U32, _M, 0),
    # --- RFC 4006 / RFC 8506 credit control (§8 table) ---------------------------
    (411, "CC-Correlation-Id", _OS, _MAY, 0),
    (412, "CC-Input-Octets", _U64, _M, 0),
    (413, "CC-Money", _GRP, _M, 0),
    (414, "CC-Output-Octets", _U64, _M, 0),
    (415, "CC-Request-Number", _U32, _M, 0),
    (416, "CC-Request-Type", _ENUM, _M, 0),
    (417, "CC-Service-Specific-Units", _U64, _M, 0),
    (418, "CC-Session-Failover", _ENUM, _M, 0),
    (419, "CC-Sub-Session-Id", _U64, _M, 0),
    (420, "CC-Time", _U32, _M, 0),
    (421, "CC-Total-Octets", _U64, _M, 0),
    (422, "Check-Balance-Result", _ENUM, _M, 0),
    (423, "Cost-Information", _GRP, _M, 0),
    (424, "Cost-Unit", _UTF8, _M, 0),
    (425, "Currency-Code", _U32, _M, 0),
    (426, "Credit-Control", _ENUM, _M, 0),
    (427, "Credit-Control-Failure-Handling", _ENUM, _M, 0),
    (428, "Direct-Debiting-Failure-Handling", _ENUM, _M, 0),
    (429, "Exponent", _I32, _M, 0),
    (430, "Final-Unit-Indication", _GRP, _M, 0),
    (431, "Granted-Service-Unit", _GRP, _M, 0),
    (432, "Rating-Group", _U32, _M, 0),
    (433, "Redirect-Address-Type", _ENUM, _M, 0),
    (434, "Redirect-Server", _GRP, _M, 0),
    (435, "Redirect-Server-Address", _UTF8, _M, 0),
    (436, "Requested-Action", _ENUM, _M, 0),
    (437, "Requested-Service-Unit", _GRP, _M, 0),
    (438, "Restriction-Filter-Rule", _IPF, _M, 0),
    (439, "Service-Identifier", _U32, _M, 0),
    (440, "Service-Parameter-Info", _GRP, _MAY, 0),
    (441, "Service-Parameter-Type", _U32, _MAY, 0),
    (442, "Service-Parameter-Value", _OS, _MAY, 0),
    (443, "Subscription-Id", _GRP, _M, 0),
    (444, "Subscription-Id-Data", _UTF8, _M, 0),
    (445, "Unit-Value", _GRP, _M, 0),
    (446, "Used-Service-Unit", _GRP, _M, 0),
    (447, "Value-Digits", _I64, _M, 0),
    (448, "Validity-Time", _U32, _M, 0),
    (449, "Final-Unit-Action", _ENUM, _M, 0),
    (450, "Subscription-Id-Type", _ENUM, _M, 0),
    (451, "Tariff-Time-Change", _TIME, _M, 0),
    (452, "Tariff-Change-Usage", _ENUM, _M, 0),
    (453, "G-S-U-Pool-Identifier", _U32, _M, 0),
    (454, "CC-Unit-Type", _ENUM, _M, 0),
    (455, "Multiple-Services-Indicator", _ENUM, _M, 0),
    (456, "Multiple-Services-Credit-Control", _GRP, _M, 0),
    (457, "G-S-U-Pool-Reference", _GRP, _M, 0),
    (458, "User-Equipment-Info", _GRP, _MAY, 0),
    (459, "User-Equipment-Info-Type", _ENUM, _MAY, 0),
    (460, "User-Equipment-Info-Value", _OS, _MAY, 0),
    (461, "Service-Context-Id", _UTF8, _M, 0),
    # --- 3GPP TS 29.061 / TS 32.299 Gy (vendor 10415), the common CCR content -----
    (2, "3GPP-Charging-Id", _OS, _MAY, _3G),
    (8, "3GPP-IMSI-MCC-MNC", _UTF8, _MAY, _3G),
    (18, "3GPP-SGSN-MCC-MNC", _UTF8, _MAY, _3G),
    (21, "3GPP-RAT-Type", _OS, _MAY, _3G),
    (22, "3GPP-User-Location-Info", _OS, _MAY, _3G),
    (23, "3GPP-MS-TimeZone", _OS, _MAY, _3G),
    (829, "Role-Of-Node", _ENUM, _M, _3G),
    (831, "Calling-Party-Address", _UTF8, _M, _3G),
    (832, "Called-Party-Address", _UTF8, _M, _3G),
    (841, "IMS-Charging-Identifier", _UTF8, _M, _3G),
    (862, "Node-Functionality", _ENUM, _M, _3G),
    (872, "Reporting-Reason", _ENUM, _M, _3G),
    (873, "Service-Information", _GRP, _M, _3G),
    (874, "PS-Information", _GRP, _M, _3G),
    (876, "IMS-Information", _GRP, _M, _3G),
    (2000, "SMS-Information", _GRP, _M, _3G),
    (2021, "Remaining-Balance", _GRP, _M, _3G),
)

# (code, name, abbreviation of request, abbreviation of answer)
COMMAND_TABLE: Final[tuple[tuple[int, str, str, str], ...]] = (
    (257, "Capabilities-Exchange", "CER", "CEA"),
    (258, "Re-Auth", "RAR", "RAA"),
    (271, "Accounting", "ACR", "ACA"),
    (272, "Credit-Control", "CCR", "CCA"),
    (274, "Abort-Session", "ASR", "ASA"),
    (275, "Session-Termination", "STR", "STA"),
    (280, "Device-Watchdog", "DWR", "DWA"),
    (282, "Disconnect-Peer", "DPR", "DPA"),
)

# (code, RFC name) — RFC 6733 §7.1, RFC 4006 §9
RESULT_CODE_TABLE: Final[tuple[tuple[int, str], ...]] = (
    (1001, "DIAMETER_MULTI_ROUND_AUTH"),
    (2001, "DIAMETER_SUCCESS"),
    (2002, "DIAMETER_LIMITED_SUCCESS"),
    (3001, "DIAMETER_COMMAND_UNSUPPORTED"),
    (3002, "DIAMETER_UNABLE_TO_DELIVER"),
    (3003, "DIAMETER_REALM_NOT_SERVED"),
    (3004, "DIAMETER_TOO_BUSY"),
    (3005, "DIAMETER_LOOP_DETECTED"),
    (3006, "DIAMETER_REDIRECT_INDICATION"),
    (3007, "DIAMETER_APPLICATION_UNSUPPORTED"),
    (3008, "DIAMETER_INVALID_HDR_BITS"),
    (3009, "DIAMETER_INVALID_AVP_BITS"),
    (3010, "DIAMETER_UNKNOWN_PEER"),
    (4001, "DIAMETER_AUTHENTICATION_REJECTED"),
    (4002, "DIAMETER_OUT_OF_SPACE"),
    (4003, "DIAMETER_ELECTION_LOST"),
    (4010, "DIAMETER_END_USER_SERVICE_DENIED"),
    (4011, "DIAMETER_CREDIT_CONTROL_NOT_APPLICABLE"),
    (4012, "DIAMETER_CREDIT_LIMIT_REACHED"),
    (5001, "DIAMETER_AVP_UNSUPPORTED"),
    (5002, "DIAMETER_UNKNOWN_SESSION_ID"),
    (5003, "DIAMETER_AUTHORIZATION_REJECTED"),
    (5004, "DIAMETER_INVALID_AVP_VALUE"),
    (5005, "DIAMETER_MISSING_AVP"),
    (5006, "DIAMETER_RESOURCES_EXCEEDED"),
    (5007, "DIAMETER_CONTRADICTING_AVPS"),
    (5008, "DIAMETER_AVP_NOT_ALLOWED"),
    (5009, "DIAMETER_AVP_OCCURS_TOO_MANY_TIMES"),
    (5010, "DIAMETER_NO_COMMON_APPLICATION"),
    (5011, "DIAMETER_UNSUPPORTED_VERSION"),
    (5012, "DIAMETER_UNABLE_TO_COMPLY"),
    (5013, "DIAMETER_INVALID_BIT_IN_HEADER"),
    (5014, "DIAMETER_INVALID_AVP_LENGTH"),
    (5015, "DIAMETER_INVALID_MESSAGE_LENGTH"),
    (5016, "DIAMETER_INVALID_AVP_BIT_COMBO"),
    (5017, "DIAMETER_NO_COMMON_SECURITY"),
    (5030, "DIAMETER_USER_UNKNOWN"),
    (5031, "DIAMETER_RATING_FAILED"),
)

# (id, name)
APPLICATION_TABLE: Final[tuple[tuple[int, str], ...]] = (
    (0, "DIAMETER_COMMON_MESSAGES"),
    (3, "DIAMETER_BASE_ACCOUNTING"),
    (4, "DIAMETER_CREDIT_CONTROL"),
    (0xFFFFFFFF, "RELAY"),
)

# Enumerated values the node and the simulators use, by AVP name.
ENUM_TABLE: Final[dict[str, tuple[tuple[int, str], ...]]] = {
    "CC-Request-Type": (
        (1, "INITIAL_REQUEST"),
        (2, "UPDATE_REQUEST"),
        (3, "TERMINATION_REQUEST"),
        (4, "EVENT_REQUEST"),
    ),
    "Requested-Action": (
        (0, "DIRECT_DEBITING"),
        (1, "REFUND_ACCOUNT"),
        (2, "CHECK_BALANCE"),
        (3, "PRICE_ENQUIRY"),
    ),
    "Check-Balance-Result": ((0, "ENOUGH_CREDIT"), (1, "NO_CREDIT")),
    "Subscription-Id-Type": (
        (0, "END_USER_E164"),
        (1, "END_USER_IMSI"),
        (2, "END_USER_SIP_URI"),
        (3, "END_USER_NAI"),
        (4, "END_USER_PRIVATE"),
    ),
    "Disconnect-Cause": ((0, "REBOOTING"), (1, "BUSY"), (2, "DO_NOT_WANT_TO_TALK_TO_YOU")),
    "Termination-Cause": (
        (1, "DIAMETER_LOGOUT"),
        (2, "DIAMETER_SERVICE_NOT_PROVIDED"),
        (3, "DIAMETER_BAD_ANSWER"),
        (4, "DIAMETER_ADMINISTRATIVE"),
        (5, "DIAMETER_LINK_BROKEN"),
        (6, "DIAMETER_AUTH_EXPIRED"),
        (7, "DIAMETER_USER_MOVED"),
        (8, "DIAMETER_SESSION_TIMEOUT"),
    ),
    "Multiple-Services-Indicator": (
        (0, "MULTIPLE_SERVICES_NOT_SUPPORTED"),
        (1, "MULTIPLE_SERVICES_SUPPORTED"),
    ),
    "CC-Session-Failover": ((0, "FAILOVER_NOT_SUPPORTED"), (1, "FAILOVER_SUPPORTED")),
    "Credit-Control-Failure-Handling": ((0, "TERMINATE"), (1, "CONTINUE"), (2, "RETRY_AND_TERMINATE")),
    "Direct-Debiting-Failure-Handling": ((0, "TERMINATE_OR_BUFFER"), (1, "CONTINUE")),
    "Final-Unit-Action": ((0, "TERMINATE"), (1, "REDIRECT"), (2, "RESTRICT_ACCESS")),
}


@dataclass(frozen=True, slots=True)
class AvpDef:
    """One row of AVP_TABLE, as the codec and validator use it."""

    code: int
    name: str
    type: AvpType
    m_rule: FlagRule
    vendor_id: int

    @property
    def default_flags(self) -> int:
        """Flags a sender sets: V iff vendor-specific, M iff the RFC says MUST."""
        return (0x80 if self.vendor_id else 0) | (0x40 if self.m_rule is FlagRule.MUST else 0)


def avp_key(code: int, vendor_id: int) -> int:
    """One int per (code, vendor): cheaper to hash than a tuple on the hot path."""
    return code | (vendor_id << 32)


AVP_BY_KEY: Final[dict[int, AvpDef]] = {
    avp_key(code, vendor): AvpDef(code, name, typ, m_rule, vendor)
    for code, name, typ, m_rule, vendor in AVP_TABLE
}
AVP_BY_NAME: Final[dict[str, AvpDef]] = {d.name: d for d in AVP_BY_KEY.values()}
COMMAND_NAMES: Final[dict[int, str]] = {code: name for code, name, _, _ in COMMAND_TABLE}
RESULT_CODE_NAMES: Final[dict[int, str]] = dict(RESULT_CODE_TABLE)


def avp_def(code: int, vendor_id: int = 0) -> AvpDef | None:
    """The dictionary entry for an AVP, or None when we do not know it."""
    return AVP_BY_KEY.get(avp_key(code, vendor_id))


def avp_name(code: int, vendor_id: int = 0) -> str:
    d = AVP_BY_KEY.get(avp_key(code, vendor_id))
    return d.name if d else f"AVP-{code}" + (f"/{vendor_id}" if vendor_id else "")


# --- grammar: the parts of the RFC ABNF we enforce ----------------------------------
# AVPs are named by (code, vendor). "required" AVPs must occur at least once; "once"
# AVPs may occur at most once (the ABNF's "{X}" / "[X]" without a repeat count).


@dataclass(frozen=True, slots=True)
class Grammar:
    required: tuple[tuple[int, int], ...]
    once: Collection[tuple[int, int]]  # stored as a frozenset (membership tests)
    # P bit rule for commands: True must be set, False must be clear, None either.
    proxiable: bool | None = None
    # The same, as avp_key() ints: what the validator hashes on its hot path.
    required_keys: tuple[int, ...] = field(init=False, default=())
    once_keys: frozenset[int] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        object.__setattr__(self, "once", frozenset(self.once))
        object.__setattr__(self, "required_keys",
                           tuple(avp_key(c, v) for c, v in self.required))
        object.__setattr__(self, "once_keys", frozenset(avp_key(c, v) for c, v in self.once))


def _k(*names: str) -> tuple[tuple[int, int], ...]:
    return tuple((AVP_BY_NAME[n].code, AVP_BY_NAME[n].vendor_id) for n in names)


_ANSWER_ONCE = ("Result-Code", "Origin-Host", "Origin-Realm", "Error-Message",
                "Error-Reporting-Host", "Failed-AVP", "Origin-State-Id", "Experimental-Result")

# RFC 6733 §7.2: the generic answer format every E-bit (protocol error) answer uses.
ERROR_ANSWER_GRAMMAR: Final = Grammar(
    required=_k("Origin-Host", "Origin-Realm"),
    once=_k("Session-Id", "Origin-Host", "Origin-Realm", "Result-Code", "Error-Message",
            "Error-Reporting-Host", "Failed-AVP"),
)

_CCR_ONCE = ("Session-Id", "Origin-Host", "Origin-Realm", "Destination-Realm",
             "Auth-Application-Id", "Service-Context-Id", "CC-Request-Type",
             "CC-Request-Number", "Destination-Host", "User-Name", "CC-Sub-Session-Id",
             "Acct-Multi-Session-Id", "Origin-State-Id", "Event-Timestamp",
             "Termination-Cause", "Requested-Service-Unit", "Requested-Action",
             "Multiple-Services-Indicator", "CC-Correlation-Id", "User-Equipment-Info",
             "Service-Identifier")
_CCA_ONCE = ("Session-Id", "Result-Code", "Origin-Host", "Origin-Realm",
             "Auth-Application-Id", "CC-Request-Type", "CC-Request-Number", "User-Name",
             "CC-Session-Failover", "CC-Sub-Session-Id", "Acct-Multi-Session-Id",
             "Origin-State-Id", "Event-Timestamp", "Granted-Service-Unit",
             "Cost-Information", "Final-Unit-Indication", "Check-Balance-Result",
             "Credit-Control-Failure-Handling", "Direct-Debiting-Failure-Handling",
             "Validity-Time", "Error-Message", "Error-Reporting-Host", "Failed-AVP")

# (command code, is request) -> grammar
COMMAND_GRAMMAR: Final[dict[tuple[int, bool], Grammar]] = {
    (257, True): Grammar(
        _k("Origin-Host", "Origin-Realm", "Host-IP-Address", "Vendor-Id", "Product-Name"),
        _k("Origin-Host", "Origin-Realm", "Vendor-Id", "Product-Name", "Origin-State-Id",
           "Firmware-Revision"),
        proxiable=False,
    ),
    (257, False): Grammar(
        _k("Result-Code", "Origin-Host", "Origin-Realm", "Host-IP-Address", "Vendor-Id",
           "Product-Name"),
        _k(*_ANSWER_ONCE, "Vendor-Id", "Product-Name", "Firmware-Revision"),
        proxiable=False,
    ),
    (280, True): Grammar(_k("Origin-Host", "Origin-Realm"),
                         _k("Origin-Host", "Origin-Realm", "Origin-State-Id"), proxiable=False),
    (280, False): Grammar(_k("Result-Code", "Origin-Host", "Origin-Realm"), _k(*_ANSWER_ONCE),
                          proxiable=False),
    (282, True): Grammar(_k("Origin-Host", "Origin-Realm", "Disconnect-Cause"),
                         _k("Origin-Host", "Origin-Realm", "Disconnect-Cause"), proxiable=False),
    (282, False): Grammar(_k("Result-Code", "Origin-Host", "Origin-Realm"), _k(*_ANSWER_ONCE),
                          proxiable=False),
    (272, True): Grammar(
        _k("Session-Id", "Origin-Host", "Origin-Realm", "Destination-Realm",
           "Auth-Application-Id", "Service-Context-Id", "CC-Request-Type", "CC-Request-Number"),
        _k(*_CCR_ONCE),
        proxiable=True,
    ),
    (272, False): Grammar(
        _k("Session-Id", "Result-Code", "Origin-Host", "Origin-Realm", "Auth-Application-Id",
           "CC-Request-Type", "CC-Request-Number"),
        _k(*_CCA_ONCE),
        proxiable=True,
    ),
    (258, True): Grammar(
        _k("Session-Id", "Origin-Host", "Origin-Realm", "Destination-Realm",
           "Destination-Host", "Auth-Application-Id", "Re-Auth-Request-Type"),
        _k("Session-Id", "Origin-Host", "Origin-Realm", "Destination-Realm",
           "Destination-Host", "Auth-Application-Id", "Re-Auth-Request-Type", "User-Name",
           "Origin-State-Id"),
        proxiable=True,
    ),
    (258, False): Grammar(_k("Session-Id", "Result-Code", "Origin-Host", "Origin-Realm"),
                          _k("Session-Id", *_ANSWER_ONCE, "User-Name"), proxiable=True),
    (274, True): Grammar(
        _k("Session-Id", "Origin-Host", "Origin-Realm", "Destination-Realm",
           "Destination-Host", "Auth-Application-Id"),
        _k("Session-Id", "Origin-Host", "Origin-Realm", "Destination-Realm",
           "Destination-Host", "Auth-Application-Id", "User-Name", "Origin-State-Id"),
        proxiable=True,
    ),
    (274, False): Grammar(_k("Session-Id", "Result-Code", "Origin-Host", "Origin-Realm"),
                          _k("Session-Id", *_ANSWER_ONCE, "User-Name"), proxiable=True),
}

# grouped AVP (code, vendor) -> grammar of its children
GROUPED_GRAMMAR: Final[dict[tuple[int, int], Grammar]] = {
    _k("Subscription-Id")[0]: Grammar(_k("Subscription-Id-Type", "Subscription-Id-Data"),
                                      _k("Subscription-Id-Type", "Subscription-Id-Data")),
    _k("CC-Money")[0]: Grammar(_k("Unit-Value"), _k("Unit-Value", "Currency-Code")),
    _k("Unit-Value")[0]: Grammar(_k("Value-Digits"), _k("Value-Digits", "Exponent")),
    _k("Experimental-Result")[0]: Grammar(_k("Vendor-Id", "Experimental-Result-Code"),
                                          _k("Vendor-Id", "Experimental-Result-Code")),
    _k("Vendor-Specific-Application-Id")[0]: Grammar(
        _k("Vendor-Id"), _k("Vendor-Id", "Auth-Application-Id", "Acct-Application-Id")),
    _k("Proxy-Info")[0]: Grammar(_k("Proxy-Host", "Proxy-State"), _k("Proxy-Host", "Proxy-State")),
    _k("Final-Unit-Indication")[0]: Grammar(_k("Final-Unit-Action"), _k("Final-Unit-Action")),
    _k("Cost-Information")[0]: Grammar(_k("Unit-Value", "Currency-Code"),
                                       _k("Unit-Value", "Currency-Code", "Cost-Unit")),
    _k("Requested-Service-Unit")[0]: Grammar((), _k("CC-Time", "CC-Money", "CC-Total-Octets",
                                                    "CC-Input-Octets", "CC-Output-Octets",
                                                    "CC-Service-Specific-Units")),
    _k("Granted-Service-Unit")[0]: Grammar((), _k("Tariff-Time-Change", "CC-Time", "CC-Money",
                                                  "CC-Total-Octets", "CC-Input-Octets",
                                                  "CC-Output-Octets",
                                                  "CC-Service-Specific-Units")),
}


# --- constants generator --------------------------------------------------------------


def _const_name(name: str) -> str:
    # Always used behind a prefix (AVP_, CMD_, ...), so a leading digit is fine.
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").upper()


def render_constants() -> str:
    """The text of constants.py: one named constant per row of the tables above."""
    lines = [
        '"""Named Diameter constants, GENERATED from the tables in dictionary.py.',
        "",
        "Do not edit: regenerate with",
        "    python -m extrabalance.diameter.dictionary > extrabalance/diameter/constants.py",
        '"""',
        "",
        "from typing import Final",
        "",
        f"VENDOR_3GPP: Final = {VENDOR_3GPP}",
        "",
        "# AVP codes (the vendor is in dictionary.AVP_TABLE)",
    ]
    for code, name, _t, _m, _v in AVP_TABLE:
        lines.append(f"AVP_{_const_name(name)}: Final = {code}")
    lines += ["", "# command codes"]
    for code, name, req, ans in COMMAND_TABLE:
        lines.append(f"CMD_{_const_name(name)}: Final = {code}  # {req}/{ans}")
    lines += ["", "# application ids"]
    for app, name in APPLICATION_TABLE:
        lines.append(f"APP_{name}: Final = {app:#x}" if app > 0xFFFF else f"APP_{name}: Final = {app}")
    lines += ["", "# result codes"]
    for code, name in RESULT_CODE_TABLE:
        lines.append(f"{name}: Final = {code}")
    lines += ["", "# enumerated values"]
    for avp, values in ENUM_TABLE.items():
        prefix = _const_name(avp)
        for value, vname in values:
            lines.append(f"{prefix}_{vname}: Final = {value}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_constants(), end="")
