"""The one MSISDN rule (core/msisdn.py), at its exact boundaries: E.164 digits, 1 to 15
of them, ASCII only; a person's `+` and spaces are dropped before the check."""

from __future__ import annotations

import pytest

from extrabalance.core.msisdn import MSISDN_DIGITS_MAX, is_msisdn, parse_msisdn


def test_the_limit_is_e164s_fifteen_digits():
    assert MSISDN_DIGITS_MAX == 15


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("2", True),  # one digit is the shortest
        ("", False),
        ("2" * 15, True),
        ("2" * 16, False),
        ("20100000000a", False),
        ("+201000000001", False),  # the bare check takes digits only
        ("٢٠١٠٠", False),  # Arabic-Indic digits: digits, but not ASCII
        ("²", False),  # a digit to str.isdigit, not ASCII
    ],
)
def test_is_msisdn(text, ok):
    assert is_msisdn(text) is ok


@pytest.mark.parametrize(
    ("text", "digits"),
    [
        ("201000000001", "201000000001"),
        ("+20 100 000 0001", "201000000001"),
        ("  +201000000001 ", "201000000001"),
        ("+" + "9" * 15, "9" * 15),
    ],
)
def test_parse_msisdn_takes_what_a_person_types(text, digits):
    assert parse_msisdn(text) == digits


@pytest.mark.parametrize("text", ["", "+", "+" + "9" * 16, "20-100", "++20100", "٢٠١٠٠"])
def test_parse_msisdn_refuses_anything_else_naming_the_input(text):
    with pytest.raises(ValueError, match="is not an MSISDN") as caught:
        parse_msisdn(text)
    assert repr(text) in str(caught.value)
