"""What the node takes as a subscriber number (MSISDN): E.164 digits, at most 15
(ITU-T E.164 §6), ASCII only, no `+` or spaces. One rule for every entry point: the
handset simulator, SMPP, Diameter, MQTT recharges, the admin API and the CLI."""

from __future__ import annotations

from typing import Final

MSISDN_DIGITS_MAX: Final = 15


def is_msisdn(text: str) -> bool:
    """ASCII digits only, 1 to 15 of them."""
    return 1 <= len(text) <= MSISDN_DIGITS_MAX and text.isascii() and text.isdigit()


def parse_msisdn(text: str) -> str:
    """A number as a person types it (`+20 100 000 0001`, `201000000001`) → its digits.

    Raises ValueError naming the input when it is not an E.164 number.
    """
    digits = text.strip().removeprefix("+").replace(" ", "")
    if not is_msisdn(digits):
        raise ValueError(f"{text!r} is not an MSISDN: E.164 digits, at most "
                         f"{MSISDN_DIGITS_MAX}, optionally after a '+'")
    return digits
