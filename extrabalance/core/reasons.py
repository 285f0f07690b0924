"""Refusal reasons. Each one is a stable code that templates turn into words and
reports count; never rename a value, only add."""

from enum import Enum


class Reason(str, Enum):
    NO_SEGMENT = "NO_SEGMENT"  # subscriber matches no segment
    TENURE_TOO_SHORT = "TENURE_TOO_SHORT"
    BALANCE_TOO_HIGH = "BALANCE_TOO_HIGH"  # still has enough credit
    CEILING_REACHED = "CEILING_REACHED"  # this loan would pass the segment ceiling
    TIER_NOT_ALLOWED = "TIER_NOT_ALLOWED"  # tier not offered to this segment
    UNKNOWN_TIER = "UNKNOWN_TIER"
    BARRED_BAD_DEBT = "BARRED_BAD_DEBT"  # too many loans without a full payback
    BARRED_MANUAL = "BARRED_MANUAL"  # barred by an operator
    OPERATION_PENDING = "OPERATION_PENDING"  # a loan or recovery is still settling
    NOT_OPTED_IN = "NOT_OPTED_IN"  # auto-advance needs opt-in
    UNKNOWN_SUBSCRIBER = "UNKNOWN_SUBSCRIBER"  # MSISDN outside every IN range
    IN_REFUSED = "IN_REFUSED"  # the IN declined the credit
    IN_UNAVAILABLE = "IN_UNAVAILABLE"  # outcome unknown; the resolver settles it
    LOAN_CAP_REACHED = "LOAN_CAP_REACHED"  # most loans allowed in the rolling window taken
    COOLING_OFF = "COOLING_OFF"  # a pause after several loans in a short time
