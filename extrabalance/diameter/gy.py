"""Credit control (RFC 4006/8506, 3GPP Gy) as the node and the IN simulator use it.

This file owns the mapping between the two Gy exchanges of docs/protocols.md and typed
values: ``CreditControlRequest`` / ``CreditControlAnswer`` ⇄ ``codec.Message``,
CC-Money ⇄ integer minor units, and Session-Id generation (RFC 6733 §8.8). It is
symmetric: either side of the wire builds and parses with the same functions.

Money: inside the node an amount is an ``int`` count of minor units (piastres,
cents). On the wire it is CC-Money{Unit-Value{Value-Digits, Exponent},
Currency-Code}, worth Value-Digits × 10^Exponent major units. We send
Value-Digits = amount_minor, Exponent = -currency_exponent, and accept any
(digits, exponent) that is a whole number of minor units (``1000, -2`` and
``10, 0`` are both 10.00 EGP); anything finer is 5004 DIAMETER_INVALID_AVP_VALUE.
"""

from __future__ import annotations

import itertools
import os
import struct
from dataclasses import MISSING, dataclass, fields
from functools import lru_cache
from typing import Any, Final, TypeVar

from extrabalance.clock import SYSTEM_CLOCK, Clock

from . import codec
from .codec import Avp, DiameterError, Message, avp
from .constants import (
    APP_DIAMETER_CREDIT_CONTROL,
    AVP_AUTH_APPLICATION_ID,
    AVP_CC_MONEY,
    AVP_CC_REQUEST_NUMBER,
    AVP_CC_REQUEST_TYPE,
    AVP_CC_SERVICE_SPECIFIC_UNITS,
    AVP_CC_TIME,
    AVP_CC_TOTAL_OCTETS,
    AVP_CHECK_BALANCE_RESULT,
    AVP_CURRENCY_CODE,
    AVP_DESTINATION_HOST,
    AVP_DESTINATION_REALM,
    AVP_ERROR_MESSAGE,
    AVP_EVENT_TIMESTAMP,
    AVP_EXPERIMENTAL_RESULT,
    AVP_EXPERIMENTAL_RESULT_CODE,
    AVP_EXPONENT,
    AVP_GRANTED_SERVICE_UNIT,
    AVP_MULTIPLE_SERVICES_CREDIT_CONTROL,
    AVP_MULTIPLE_SERVICES_INDICATOR,
    AVP_ORIGIN_HOST,
    AVP_ORIGIN_REALM,
    AVP_RATING_GROUP,
    AVP_REQUESTED_ACTION,
    AVP_REQUESTED_SERVICE_UNIT,
    AVP_RESULT_CODE,
    AVP_SERVICE_CONTEXT_ID,
    AVP_SERVICE_IDENTIFIER,
    AVP_SESSION_ID,
    AVP_SUBSCRIPTION_ID,
    AVP_SUBSCRIPTION_ID_DATA,
    AVP_SUBSCRIPTION_ID_TYPE,
    AVP_UNIT_VALUE,
    AVP_USED_SERVICE_UNIT,
    AVP_VALUE_DIGITS,
    CC_REQUEST_TYPE_EVENT_REQUEST,
    CC_REQUEST_TYPE_INITIAL_REQUEST,
    CC_REQUEST_TYPE_TERMINATION_REQUEST,
    CC_REQUEST_TYPE_UPDATE_REQUEST,
    CHECK_BALANCE_RESULT_ENOUGH_CREDIT,
    CHECK_BALANCE_RESULT_NO_CREDIT,
    CMD_CREDIT_CONTROL,
    REQUESTED_ACTION_CHECK_BALANCE,
    REQUESTED_ACTION_DIRECT_DEBITING,
    REQUESTED_ACTION_REFUND_ACCOUNT,
    SUBSCRIPTION_ID_TYPE_END_USER_E164,
)
from .dictionary import avp_name

INITIAL_REQUEST: Final = CC_REQUEST_TYPE_INITIAL_REQUEST
UPDATE_REQUEST: Final = CC_REQUEST_TYPE_UPDATE_REQUEST
TERMINATION_REQUEST: Final = CC_REQUEST_TYPE_TERMINATION_REQUEST
EVENT_REQUEST: Final = CC_REQUEST_TYPE_EVENT_REQUEST
DIRECT_DEBITING: Final = REQUESTED_ACTION_DIRECT_DEBITING
REFUND_ACCOUNT: Final = REQUESTED_ACTION_REFUND_ACCOUNT
CHECK_BALANCE: Final = REQUESTED_ACTION_CHECK_BALANCE
ENOUGH_CREDIT: Final = CHECK_BALANCE_RESULT_ENOUGH_CREDIT
NO_CREDIT: Final = CHECK_BALANCE_RESULT_NO_CREDIT
END_USER_E164: Final = SUBSCRIPTION_ID_TYPE_END_USER_E164
DEFAULT_SERVICE_CONTEXT_ID: Final = "extrabalance@3gpp.org"

# E.164 allows at most 15 digits.
MSISDN_DIGITS_MAX: Final = 15
# Largest amount we put on the wire: Value-Digits is Integer64.
AMOUNT_MINOR_MAX: Final = (1 << 63) - 1
# Bound on the cache of encoded constant AVPs (identities, tier amounts): these
# repeat on every request, so we build each once.
AVP_CACHE_MAX: Final = 4096


_T = TypeVar("_T")


def _init_through_slots(cls: type[_T]) -> type[_T]:
    """Give a frozen, slotted, keyword-only dataclass a faster ``__init__``.

    The generated one stores each field with ``object.__setattr__`` (looked up per
    field, since frozen classes refuse ordinary assignment); this one calls each
    slot's descriptor directly: the same signature, defaults and frozen instance,
    in about half the time. A CCR/CCA object is built for every request.
    """
    params = []
    stores = []
    namespace: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.default is not MISSING:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        elif f.default_factory is not MISSING or not f.kw_only:
            raise TypeError(f"{cls.__name__}.{f.name}: only keyword fields with plain defaults")
        else:
            params.append(f.name)
        namespace[f"_set_{f.name}"] = getattr(cls, f.name).__set__
        stores.append(f"    _set_{f.name}(self, {f.name})")
    source = f"def __init__(self, *, {', '.join(params)}):\n" + "\n".join(stores) + "\n"
    exec(source, namespace)  # noqa: S102 - our own field names, as dataclasses does
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


# The unit AVPs a bundle is counted in (RFC 4006 §8.18 Requested-Service-Unit, §8.17
# Granted-Service-Unit): data in octets (CC-Total-Octets §8.23, Unsigned64), voice in
# seconds (CC-Time §8.21, Unsigned32), SMS in units (CC-Service-Specific-Units §8.26,
# Unsigned64).
BUNDLE_UNIT_AVPS: Final = {"data": AVP_CC_TOTAL_OCTETS, "voice": AVP_CC_TIME,
                           "sms": AVP_CC_SERVICE_SPECIFIC_UNITS}
_UNIT_KINDS: Final = {code: kind for kind, code in BUNDLE_UNIT_AVPS.items()}


@dataclass(frozen=True, slots=True)
class BundleUnits:
    """Units of one service in a Multiple-Services-Credit-Control (RFC 4006 §8.16):
    what a bundle advance asks the IN to credit (in the CCR's Requested-Service-Unit)
    and what the IN granted (in the CCA's Granted-Service-Unit)."""

    kind: str  # "data", "voice" or "sms": the unit AVP (BUNDLE_UNIT_AVPS)
    quantity: int
    service_identifier: int | None = None
    rating_group: int | None = None


@lru_cache(maxsize=AVP_CACHE_MAX)
def _bundle_mscc(unit_code: int, bundle: BundleUnits) -> Avp:
    """MSCC{unit-AVP{quantity}, Service-Identifier, Rating-Group} (§8.16 order)."""
    children = [avp(unit_code, (avp(BUNDLE_UNIT_AVPS[bundle.kind], bundle.quantity),))]
    if bundle.service_identifier is not None:
        children.append(avp(AVP_SERVICE_IDENTIFIER, bundle.service_identifier))
    if bundle.rating_group is not None:
        children.append(avp(AVP_RATING_GROUP, bundle.rating_group))
    return codec.intern_avp(avp(AVP_MULTIPLE_SERVICES_CREDIT_CONTROL, tuple(children)))


def _bundle_in(msg: Message, unit_code: int) -> BundleUnits | None:
    """The first MSCC whose service unit (`unit_code`) counts units other than money."""
    for mscc in msg.all(AVP_MULTIPLE_SERVICES_CREDIT_CONTROL):
        if not isinstance(mscc.value, tuple):
            continue
        unit = mscc.first(unit_code)
        if unit is None or not isinstance(unit.value, tuple):
            continue
        for child in unit.value:
            kind = _UNIT_KINDS.get(child.code)
            if kind is not None and isinstance(child.value, int):
                si, rg = mscc.get(AVP_SERVICE_IDENTIFIER), mscc.get(AVP_RATING_GROUP)
                return BundleUnits(kind, child.value,
                                   si if isinstance(si, int) else None,
                                   rg if isinstance(rg, int) else None)
    return None


@_init_through_slots
@dataclass(frozen=True, slots=True, kw_only=True)
class CreditControlRequest:
    """A CCR as the node and the IN simulator see it. Money in minor units."""

    session_id: str
    origin_host: str
    origin_realm: str
    destination_realm: str
    destination_host: str | None = None
    request_type: int = EVENT_REQUEST
    request_number: int = 0
    msisdn: str
    service_context_id: str = DEFAULT_SERVICE_CONTEXT_ID
    requested_action: int | None = None
    requested_minor: int | None = None
    currency_numeric: int | None = None
    has_mscc: bool = False
    event_timestamp: int | None = None  # NTP seconds (since 1900)
    used_minor: int | None = None  # Used-Service-Unit CC-Money (RFC 4006 §8.19)
    # A bundle advance: MSCC with the units to credit (Requested-Service-Unit in
    # CC-Total-Octets / CC-Time / CC-Service-Specific-Units) instead of CC-Money.
    bundle: BundleUnits | None = None


@_init_through_slots
@dataclass(frozen=True, slots=True, kw_only=True)
class CreditControlAnswer:
    """A CCA: Result-Code, or the Experimental-Result-Code when that is what came."""

    session_id: str
    result_code: int
    request_number: int | None
    granted_minor: int | None
    check_balance_result: int | None
    origin_host: str
    request_type: int | None = None
    currency_numeric: int | None = None
    error_message: str | None = None
    is_error: bool = False  # the E bit (3xxx protocol errors)
    experimental: bool = False  # result_code came from Experimental-Result
    granted_units: BundleUnits | None = None  # MSCC Granted-Service-Unit other than money


# --- building -------------------------------------------------------------------------

_AUTH_APP_CC: Final = codec.intern_avp(avp(AVP_AUTH_APPLICATION_ID, APP_DIAMETER_CREDIT_CONTROL))
_MSI_SUPPORTED: Final = codec.intern_avp(avp(AVP_MULTIPLE_SERVICES_INDICATOR, 1))
_SUBSCRIPTION_E164: Final = codec.intern_avp(avp(AVP_SUBSCRIPTION_ID_TYPE, END_USER_E164))


@lru_cache(maxsize=AVP_CACHE_MAX)
def _cached_avp(code: int, value: str | int) -> Avp:
    return codec.intern_avp(avp(code, value))


@lru_cache(maxsize=AVP_CACHE_MAX)
def _cc_money(amount_minor: int, currency_numeric: int | None, currency_exponent: int) -> Avp:
    if not 0 <= amount_minor <= AMOUNT_MINOR_MAX:
        raise ValueError(f"amount_minor {amount_minor} out of range")
    children = [avp(AVP_UNIT_VALUE, (avp(AVP_VALUE_DIGITS, amount_minor),
                                     avp(AVP_EXPONENT, -currency_exponent)))]
    if currency_numeric is not None:
        children.append(avp(AVP_CURRENCY_CODE, currency_numeric))
    return codec.intern_avp(avp(AVP_CC_MONEY, children))


def cc_money(amount_minor: int, currency_numeric: int | None, currency_exponent: int) -> Avp:
    """CC-Money{Unit-Value{Value-Digits=amount_minor, Exponent=-exponent}, Currency-Code}."""
    return _cc_money(amount_minor, currency_numeric, currency_exponent)


@lru_cache(maxsize=AVP_CACHE_MAX)
def _service_unit(code: int, amount_minor: int, currency_numeric: int | None,
                  currency_exponent: int) -> Avp:
    """Requested-/Granted-Service-Unit{CC-Money}: tier amounts repeat, so build once."""
    return codec.intern_avp(avp(code, (_cc_money(amount_minor, currency_numeric,
                                                 currency_exponent),)))


@lru_cache(maxsize=AVP_CACHE_MAX)
def _ccr_routing(origin_host: str, origin_realm: str, destination_host: str | None,
                 destination_realm: str, service_context_id: str, request_type: int,
                 request_number: int) -> tuple[tuple[Avp, ...], bytes]:
    """The AVPs between Session-Id and Event-Timestamp, and their bytes: the same for
    every request a node sends to one IN node, so they are built (and encoded) once."""
    c = _cached_avp
    avps = [c(AVP_ORIGIN_HOST, origin_host), c(AVP_ORIGIN_REALM, origin_realm)]
    if destination_host is not None:
        avps.append(c(AVP_DESTINATION_HOST, destination_host))
    avps += [
        c(AVP_DESTINATION_REALM, destination_realm),
        _AUTH_APP_CC,
        c(AVP_SERVICE_CONTEXT_ID, service_context_id),
        c(AVP_CC_REQUEST_TYPE, request_type),
        c(AVP_CC_REQUEST_NUMBER, request_number),
    ]
    run = codec.intern_run(tuple(avps))
    return run, b"".join(codec.encode_avp(a) for a in run)


@lru_cache(maxsize=AVP_CACHE_MAX)
def _ccr_tail(requested_action: int | None, requested_minor: int | None,
              currency_numeric: int | None, currency_exponent: int,
              has_mscc: bool) -> tuple[tuple[Avp, ...], bytes]:
    """The AVPs after Subscription-Id (Requested-Action, the service unit, MSCC), and
    their bytes: one per tier amount and action, so built and encoded once."""
    avps: list[Avp] = []
    if requested_action is not None:
        avps.append(_cached_avp(AVP_REQUESTED_ACTION, requested_action))
    rsu = None
    if requested_minor is not None:
        rsu = _service_unit(AVP_REQUESTED_SERVICE_UNIT, requested_minor, currency_numeric,
                            currency_exponent)
    if has_mscc:
        avps.append(_MSI_SUPPORTED)
        avps.append(avp(AVP_MULTIPLE_SERVICES_CREDIT_CONTROL, () if rsu is None else (rsu,)))
    elif rsu is not None:
        avps.append(rsu)
    tail = tuple(avps)
    return tail, b"".join(codec.encode_avp(a) for a in tail)


@lru_cache(maxsize=AVP_CACHE_MAX)
def _ccr_bundle_tail(requested_action: int | None,
                     bundle: BundleUnits) -> tuple[tuple[Avp, ...], bytes]:
    """The tail of a bundle advance's CCR: Requested-Action, Multiple-Services-
    Indicator (MULTIPLE_SERVICES_SUPPORTED, §8.40) and one MSCC with the units to
    credit in its Requested-Service-Unit; no CC-Money (the price stays in the ledger)."""
    avps: list[Avp] = []
    if requested_action is not None:
        avps.append(_cached_avp(AVP_REQUESTED_ACTION, requested_action))
    avps += [_MSI_SUPPORTED, _bundle_mscc(AVP_REQUESTED_SERVICE_UNIT, bundle)]
    tail = tuple(avps)
    return tail, b"".join(codec.encode_avp(a) for a in tail)


def ntp_now(clock: Clock = SYSTEM_CLOCK) -> int:
    return codec.ntp_from_unix(clock.time())


# Flags of the per-request AVPs, from the dictionary (all M, no V).
_F_SESSION_ID: Final = avp(AVP_SESSION_ID, "").flags
_F_EVENT_TIMESTAMP: Final = avp(AVP_EVENT_TIMESTAMP, 0).flags
_F_SUBSCRIPTION_ID: Final = avp(AVP_SUBSCRIPTION_ID, ()).flags
_F_SUBSCRIPTION_ID_DATA: Final = avp(AVP_SUBSCRIPTION_ID_DATA, "").flags
_SUBSCRIPTION_E164_BYTES: Final = codec.encode_avp(_SUBSCRIPTION_E164)
_new = tuple.__new__
_octets_avp = codec.encode_octets_avp
_pack_u32_avp = struct.Struct(">III").pack
_REQUEST_FLAGS: Final = codec.FLAG_REQUEST | codec.FLAG_PROXIABLE


def build_ccr(
    ccr: CreditControlRequest,
    *,
    currency_exponent: int = 2,
    hop_by_hop_id: int = 0,
    end_to_end_id: int = 0,
    retransmit: bool = False,
) -> Message:
    """The CCR message for ``ccr``; the node assigns the ids when it sends it.

    Built from a template: the routing AVPs and the tail (action, amount) come
    pre-built and pre-encoded from bounded caches; only Session-Id,
    Event-Timestamp and Subscription-Id are new per request, and the body's bytes
    are handed to the codec so that ``encode`` only packs the header.
    """
    head, head_bytes = _ccr_routing(ccr.origin_host, ccr.origin_realm, ccr.destination_host,
                                    ccr.destination_realm, ccr.service_context_id,
                                    ccr.request_type, ccr.request_number)
    if ccr.bundle is None:
        tail, tail_bytes = _ccr_tail(ccr.requested_action, ccr.requested_minor,
                                     ccr.currency_numeric, currency_exponent, ccr.has_mscc)
    else:
        tail, tail_bytes = _ccr_bundle_tail(ccr.requested_action, ccr.bundle)
    session_id = ccr.session_id
    msisdn = ccr.msisdn
    stamp = ccr.event_timestamp
    sub = _new(Avp, (AVP_SUBSCRIPTION_ID, _F_SUBSCRIPTION_ID, 0, (
        _SUBSCRIPTION_E164,
        _new(Avp, (AVP_SUBSCRIPTION_ID_DATA, _F_SUBSCRIPTION_ID_DATA, 0, msisdn)))))
    first = _new(Avp, (AVP_SESSION_ID, _F_SESSION_ID, 0, session_id))
    if stamp is None:
        avps = (first, *head, sub, *tail)
    else:
        avps = (first, *head, _new(Avp, (AVP_EVENT_TIMESTAMP, _F_EVENT_TIMESTAMP, 0, stamp)),
                sub, *tail)
    try:
        body = b"".join((
            _octets_avp(AVP_SESSION_ID, _F_SESSION_ID, session_id.encode()),
            head_bytes,
            b"" if stamp is None else _pack_u32_avp(
                AVP_EVENT_TIMESTAMP, (_F_EVENT_TIMESTAMP << 24) | 12, stamp & 0xFFFFFFFF),
            codec.encode_grouped_avp(AVP_SUBSCRIPTION_ID, _F_SUBSCRIPTION_ID, (
                _SUBSCRIPTION_E164_BYTES
                + _octets_avp(AVP_SUBSCRIPTION_ID_DATA, _F_SUBSCRIPTION_ID_DATA,
                              msisdn.encode()))),
            tail_bytes,
        ))
    except (AttributeError, TypeError, ValueError, struct.error):
        pass  # a value the template cannot take: encode() reports it precisely
    else:
        codec.remember_encoding(avps, body)
    flags = _REQUEST_FLAGS | (codec.FLAG_RETRANSMIT if retransmit else 0)
    return _new(Message, (CMD_CREDIT_CONTROL, flags, APP_DIAMETER_CREDIT_CONTROL, hop_by_hop_id,
                          end_to_end_id, avps, 1))


def build_cca(
    request: Message | CreditControlRequest,
    origin_host: str,
    origin_realm: str,
    result_code: int,
    granted_minor: int | None = None,
    check_balance_result: int | None = None,
    *,
    currency_numeric: int | None,
    currency_exponent: int,
    error_message: str | None = None,
    event_timestamp: int | None = None,
    granted_units: BundleUnits | None = None,
) -> Message:
    """The CCA for ``request`` (a received CCR message, or its parsed form).

    E bit exactly for 3xxx. Granted-Service-Unit goes inside MSCC when the request
    carried MSCC (RFC 4006 §5.1.2), top level otherwise. ``granted_units`` (a bundle
    credited) is the Granted-Service-Unit in the bundle's unit, in the MSCC, with the
    request's Service-Identifier and Rating-Group. ``event_timestamp`` (NTP seconds)
    defaults to now.
    """
    if isinstance(request, Message):
        session_id = request.get(AVP_SESSION_ID)
        request_type = request.get(AVP_CC_REQUEST_TYPE)
        request_number = request.get(AVP_CC_REQUEST_NUMBER)
        request_mscc = request.first(AVP_MULTIPLE_SERVICES_CREDIT_CONTROL)
        has_mscc = request_mscc is not None
        hop_by_hop_id, end_to_end_id = request.hop_by_hop_id, request.end_to_end_id
    else:
        session_id = request.session_id
        request_type = request.request_type
        request_number = request.request_number
        request_mscc = None
        has_mscc = request.has_mscc
        hop_by_hop_id = end_to_end_id = 0
    if not has_mscc and error_message is None:
        return _build_cca_from_template(session_id, result_code, origin_host, origin_realm,
                                        request_type, request_number, granted_minor,
                                        check_balance_result, currency_numeric,
                                        currency_exponent, event_timestamp, hop_by_hop_id,
                                        end_to_end_id)
    c = _cached_avp
    avps: list[Avp] = []
    if session_id is not None:
        avps.append(avp(AVP_SESSION_ID, session_id))
    avps += _cca_head(result_code, origin_host, origin_realm, request_type, request_number)[0]
    avps.append(avp(AVP_EVENT_TIMESTAMP,
                    ntp_now() if event_timestamp is None else event_timestamp))
    gsu = None
    if granted_minor is not None:
        gsu = _service_unit(AVP_GRANTED_SERVICE_UNIT, granted_minor, currency_numeric,
                            currency_exponent)
    elif granted_units is not None:
        gsu = avp(AVP_GRANTED_SERVICE_UNIT,
                  (avp(BUNDLE_UNIT_AVPS[granted_units.kind], granted_units.quantity),))
    if has_mscc:
        children: list[Avp] = []
        if gsu is not None:
            children.append(gsu)
        if request_mscc is not None:
            # Echo the service the quota is for (RFC 4006 §8.16).
            for code in (AVP_SERVICE_IDENTIFIER, AVP_RATING_GROUP):
                found = request_mscc.first(code)
                if found is not None:
                    children.append(found)
        children.append(c(AVP_RESULT_CODE, result_code))
        avps.append(avp(AVP_MULTIPLE_SERVICES_CREDIT_CONTROL, children))
    elif gsu is not None:
        avps.append(gsu)
    if check_balance_result is not None:
        avps.append(c(AVP_CHECK_BALANCE_RESULT, check_balance_result))
    if error_message:
        avps.append(avp(AVP_ERROR_MESSAGE, error_message))
    return Message(CMD_CREDIT_CONTROL, _answer_flags(result_code), APP_DIAMETER_CREDIT_CONTROL,
                   hop_by_hop_id, end_to_end_id, tuple(avps))


def _answer_flags(result_code: int) -> int:
    return codec.FLAG_PROXIABLE | (codec.FLAG_ERROR if 3000 <= result_code < 4000 else 0)


@lru_cache(maxsize=AVP_CACHE_MAX)
def _cca_head(result_code: int, origin_host: str, origin_realm: str, request_type: int | None,
              request_number: int | None) -> tuple[tuple[Avp, ...], bytes]:
    """The AVPs between Session-Id and Event-Timestamp of a CCA, and their bytes."""
    c = _cached_avp
    avps = [c(AVP_RESULT_CODE, result_code), c(AVP_ORIGIN_HOST, origin_host),
            c(AVP_ORIGIN_REALM, origin_realm), _AUTH_APP_CC]
    if request_type is not None:
        avps.append(c(AVP_CC_REQUEST_TYPE, request_type))
    if request_number is not None:
        avps.append(c(AVP_CC_REQUEST_NUMBER, request_number))
    run = codec.intern_run(tuple(avps))
    return run, b"".join(codec.encode_avp(a) for a in run)


@lru_cache(maxsize=AVP_CACHE_MAX)
def _cca_tail(granted_minor: int | None, check_balance_result: int | None,
              currency_numeric: int | None, currency_exponent: int
              ) -> tuple[tuple[Avp, ...], bytes]:
    """The AVPs after Event-Timestamp of a CCA without MSCC, and their bytes."""
    avps: list[Avp] = []
    if granted_minor is not None:
        avps.append(_service_unit(AVP_GRANTED_SERVICE_UNIT, granted_minor, currency_numeric,
                                  currency_exponent))
    if check_balance_result is not None:
        avps.append(_cached_avp(AVP_CHECK_BALANCE_RESULT, check_balance_result))
    tail = tuple(avps)
    return tail, b"".join(codec.encode_avp(a) for a in tail)


def _build_cca_from_template(
    session_id: str | None, result_code: int, origin_host: str, origin_realm: str,
    request_type: int | None, request_number: int | None, granted_minor: int | None,
    check_balance_result: int | None, currency_numeric: int | None, currency_exponent: int,
    event_timestamp: int | None, hop_by_hop_id: int, end_to_end_id: int,
) -> Message:
    """build_cca without MSCC or Error-Message: static runs plus Session-Id and
    Event-Timestamp, with the body's bytes handed to the codec (as build_ccr)."""
    head, head_bytes = _cca_head(result_code, origin_host, origin_realm, request_type,
                                 request_number)
    tail, tail_bytes = _cca_tail(granted_minor, check_balance_result, currency_numeric,
                                 currency_exponent)
    stamp = ntp_now() if event_timestamp is None else event_timestamp
    stamp_avp = _new(Avp, (AVP_EVENT_TIMESTAMP, _F_EVENT_TIMESTAMP, 0, stamp))
    if session_id is None:
        avps = (*head, stamp_avp, *tail)
    else:
        avps = (_new(Avp, (AVP_SESSION_ID, _F_SESSION_ID, 0, session_id)), *head, stamp_avp,
                *tail)
    try:
        body = b"".join((
            b"" if session_id is None
            else _octets_avp(AVP_SESSION_ID, _F_SESSION_ID, session_id.encode()),
            head_bytes,
            _pack_u32_avp(AVP_EVENT_TIMESTAMP, (_F_EVENT_TIMESTAMP << 24) | 12,
                          stamp & 0xFFFFFFFF),
            tail_bytes,
        ))
    except (AttributeError, TypeError, ValueError, struct.error):
        pass  # a value the template cannot take: encode() reports it precisely
    else:
        codec.remember_encoding(avps, body)
    return _new(Message, (CMD_CREDIT_CONTROL, _answer_flags(result_code),
                          APP_DIAMETER_CREDIT_CONTROL, hop_by_hop_id, end_to_end_id, avps, 1))


# --- parsing --------------------------------------------------------------------------


def _missing(msg: Message, code: int) -> DiameterError:
    return DiameterError(5005, f"{avp_name(code)} missing",
                         (codec._zero_example(code, 0),), msg)


def _first_avps(msg: Message) -> dict[int, Avp]:
    """Code -> first top-level AVP of vendor 0, in one pass: the parsers below read a
    dozen of them, each of which `msg.first` would look for from the start."""
    first: dict[int, Avp] = {}
    setdefault = first.setdefault
    for a in msg.avps:
        if not a[2]:
            setdefault(a[0], a)
    return first


def _value(first: dict[int, Avp], code: int) -> Any:
    found = first.get(code)
    return None if found is None else found[3]


def _require(msg: Message, code: int, kind: type,
             first: dict[int, Avp] | None = None) -> object:
    found = msg.first(code) if first is None else first.get(code)
    if found is None:
        raise _missing(msg, code)
    if not isinstance(found.value, kind):
        raise DiameterError(5004, f"{found.name} has the wrong type", (found,), msg)
    return found.value


def minor_from_cc_money(money: Avp, currency_exponent: int, msg: Message) -> tuple[int, int | None]:
    """(amount_minor, currency_numeric) from a CC-Money AVP, or 5005/5004."""
    unit_value = money.first(AVP_UNIT_VALUE)
    if unit_value is None:
        raise DiameterError(5005, "Unit-Value missing in CC-Money",
                            (codec._zero_example(AVP_UNIT_VALUE, 0),), msg)
    digits = unit_value.get(AVP_VALUE_DIGITS)
    if not isinstance(digits, int):
        raise DiameterError(5005, "Value-Digits missing in Unit-Value",
                            (codec._zero_example(AVP_VALUE_DIGITS, 0),), msg)
    exponent = unit_value.get(AVP_EXPONENT, 0)
    if not isinstance(exponent, int):
        raise DiameterError(5004, "Exponent is not an integer", (unit_value,), msg)
    shift = exponent + currency_exponent
    if digits < 0:
        raise DiameterError(5004, "negative amount", (money,), msg)
    if shift >= 0:
        if shift > 18:  # more than any Integer64 amount in minor units
            raise DiameterError(5004, f"exponent {exponent} out of range", (money,), msg)
        amount_minor = digits * 10**shift
    else:
        if shift < -18:
            # 10^19 > 2^63: only zero is a whole number of minor units here.
            if digits:
                raise DiameterError(5004, f"exponent {exponent} finer than minor units",
                                    (money,), msg)
            amount_minor = 0
        else:
            amount_minor, remainder = divmod(digits, 10**-shift)
            if remainder:
                raise DiameterError(5004, "amount is not a whole number of minor units",
                                    (money,), msg)
    if amount_minor > AMOUNT_MINOR_MAX:
        raise DiameterError(5004, "amount out of range", (money,), msg)
    currency = money.get(AVP_CURRENCY_CODE)
    return amount_minor, currency if isinstance(currency, int) else None


def _service_unit_money(msg: Message, unit_code: int,
                        first: dict[int, Avp] | None = None) -> Avp | None:
    """CC-Money of the top-level service unit, else of the first MSCC that has one."""
    unit = msg.first(unit_code) if first is None else first.get(unit_code)
    if unit is None:
        for mscc in msg.all(AVP_MULTIPLE_SERVICES_CREDIT_CONTROL):
            unit = mscc.first(unit_code)
            if unit is not None:
                break
    if unit is None or not isinstance(unit.value, tuple):
        return None
    return unit.first(AVP_CC_MONEY)


def units_requested_without_money(msg: Message) -> bool:
    """A Requested-Service-Unit (top level or in an MSCC) that asks for units other
    than money (CC-Time, CC-Total-Octets, CC-Service-Specific-Units…) and none in
    CC-Money: a grant can only be in the unit asked for (RFC 4006 §8.18)."""
    units = list(msg.all(AVP_REQUESTED_SERVICE_UNIT))
    for mscc in msg.all(AVP_MULTIPLE_SERVICES_CREDIT_CONTROL):
        if isinstance(mscc.value, tuple):
            units += mscc.all(AVP_REQUESTED_SERVICE_UNIT)
    return any(isinstance(u.value, tuple) and u.value and u.first(AVP_CC_MONEY) is None
               for u in units)


def parse_ccr(msg: Message, currency_exponent: int = 2) -> CreditControlRequest:
    """The typed CCR, or the DiameterError the node answers with (5005, 5004)."""
    first = _first_avps(msg)
    session_id = _require(msg, AVP_SESSION_ID, str, first)
    origin_host = _require(msg, AVP_ORIGIN_HOST, str, first)
    origin_realm = _require(msg, AVP_ORIGIN_REALM, str, first)
    destination_realm = _require(msg, AVP_DESTINATION_REALM, str, first)
    service_context_id = _require(msg, AVP_SERVICE_CONTEXT_ID, str, first)
    request_type = _require(msg, AVP_CC_REQUEST_TYPE, int, first)
    request_number = _require(msg, AVP_CC_REQUEST_NUMBER, int, first)
    if request_type not in (1, 2, 3, 4):
        raise DiameterError(5004, f"CC-Request-Type {request_type}",
                            (first[AVP_CC_REQUEST_TYPE],), msg)
    msisdn = None
    subscriptions = msg.all(AVP_SUBSCRIPTION_ID)
    if not subscriptions:
        raise _missing(msg, AVP_SUBSCRIPTION_ID)
    for sub in subscriptions:
        if not isinstance(sub.value, tuple):
            raise DiameterError(5004, "Subscription-Id is not grouped", (sub,), msg)
        if sub.get(AVP_SUBSCRIPTION_ID_TYPE) == END_USER_E164:
            msisdn = sub.get(AVP_SUBSCRIPTION_ID_DATA)
            if not (isinstance(msisdn, str) and msisdn.isdigit() and msisdn.isascii()
                    and len(msisdn) <= MSISDN_DIGITS_MAX):
                raise DiameterError(5004, "Subscription-Id-Data is not an E.164 MSISDN",
                                    (sub,), msg)
            break
    if msisdn is None:
        raise DiameterError(5004, "no END_USER_E164 Subscription-Id", (subscriptions[0],), msg)
    action_avp = first.get(AVP_REQUESTED_ACTION)
    requested_action = None
    if action_avp is not None:
        if action_avp.value not in (DIRECT_DEBITING, REFUND_ACCOUNT, CHECK_BALANCE):
            raise DiameterError(5004, f"Requested-Action {action_avp.value!r} unsupported",
                                (action_avp,), msg)
        requested_action = action_avp.value
    requested_minor = currency_numeric = None
    money = _service_unit_money(msg, AVP_REQUESTED_SERVICE_UNIT, first)
    if money is not None:
        requested_minor, currency_numeric = minor_from_cc_money(money, currency_exponent, msg)
    bundle = _bundle_in(msg, AVP_REQUESTED_SERVICE_UNIT) if money is None else None
    used_minor = None
    used = _service_unit_money(msg, AVP_USED_SERVICE_UNIT, first)
    if used is not None:
        used_minor, _ = minor_from_cc_money(used, currency_exponent, msg)
    stamp = _value(first, AVP_EVENT_TIMESTAMP)
    destination_host = _value(first, AVP_DESTINATION_HOST)
    return CreditControlRequest(
        session_id=session_id,  # type: ignore[arg-type]
        origin_host=origin_host,  # type: ignore[arg-type]
        origin_realm=origin_realm,  # type: ignore[arg-type]
        destination_realm=destination_realm,  # type: ignore[arg-type]
        destination_host=destination_host if isinstance(destination_host, str) else None,
        request_type=request_type,
        request_number=request_number,  # type: ignore[arg-type]
        msisdn=msisdn,
        service_context_id=service_context_id,  # type: ignore[arg-type]
        requested_action=requested_action,
        requested_minor=requested_minor,
        currency_numeric=currency_numeric,
        has_mscc=AVP_MULTIPLE_SERVICES_CREDIT_CONTROL in first,
        event_timestamp=stamp if isinstance(stamp, int) else None,
        used_minor=used_minor,
        bundle=bundle,
    )


def result_code_of(msg: Message) -> tuple[int, bool] | None:
    """(code, is_experimental) from Result-Code or Experimental-Result, else None."""
    code = msg.get(AVP_RESULT_CODE)
    if isinstance(code, int):
        return code, False
    experimental = msg.first(AVP_EXPERIMENTAL_RESULT)
    if experimental is not None and isinstance(experimental.value, tuple):
        code = experimental.get(AVP_EXPERIMENTAL_RESULT_CODE)
        if isinstance(code, int):
            return code, True
    return None


def parse_cca(msg: Message, currency_exponent: int = 2) -> CreditControlAnswer:
    """The typed CCA, or DiameterError (5005 without a result code, 5004 bad money)."""
    first = _first_avps(msg)
    code = _value(first, AVP_RESULT_CODE)
    result = (code, False) if isinstance(code, int) else result_code_of(msg)
    if result is None:
        raise _missing(msg, AVP_RESULT_CODE)
    granted_minor = currency_numeric = None
    money = _service_unit_money(msg, AVP_GRANTED_SERVICE_UNIT, first)
    if money is not None:
        granted_minor, currency_numeric = minor_from_cc_money(money, currency_exponent, msg)
    granted_units = _bundle_in(msg, AVP_GRANTED_SERVICE_UNIT) if money is None else None
    session_id = _value(first, AVP_SESSION_ID)
    origin_host = _value(first, AVP_ORIGIN_HOST)
    number = _value(first, AVP_CC_REQUEST_NUMBER)
    request_type = _value(first, AVP_CC_REQUEST_TYPE)
    cbr = _value(first, AVP_CHECK_BALANCE_RESULT)
    error_message = _value(first, AVP_ERROR_MESSAGE)
    return CreditControlAnswer(
        session_id=session_id if isinstance(session_id, str) else "",
        result_code=result[0],
        request_number=number if isinstance(number, int) else None,
        granted_minor=granted_minor,
        check_balance_result=cbr if isinstance(cbr, int) else None,
        origin_host=origin_host if isinstance(origin_host, str) else "",
        request_type=request_type if isinstance(request_type, int) else None,
        currency_numeric=currency_numeric,
        error_message=error_message if isinstance(error_message, str) else None,
        is_error=msg.is_error,
        experimental=result[1],
        granted_units=granted_units,
    )


# --- Session-Id -----------------------------------------------------------------------


class SessionIdGenerator:
    """RFC 6733 §8.8 Session-Ids: ``<DiameterIdentity>;<high 32>;<low 32>[;<optional>]``.

    The high word starts at the process start time (so ids differ across restarts),
    the low word counts up; when it wraps the high word moves on. The optional part
    defaults to the process id so two processes started in the same second with the
    same identity still differ.
    """

    def __init__(self, origin_host: str, *, optional: str | None = None,
                 start_s: int | None = None) -> None:
        self._prefix = origin_host + ";"
        self._high = (int(SYSTEM_CLOCK.time()) if start_s is None else start_s) & 0xFFFFFFFF
        self._counter = itertools.count()
        self._suffix = ";" + (str(os.getpid()) if optional is None else optional) \
            if optional != "" else ""

    def next(self) -> str:
        n = next(self._counter)
        high = (self._high + (n >> 32)) & 0xFFFFFFFF
        return f"{self._prefix}{high};{n & 0xFFFFFFFF}{self._suffix}"

    __call__ = next
