"""Consumer-protection rules, pure: the fee percentage shown, the cap per rolling
window, the cooling-off pause, the presets and the decision that reads them."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extrabalance.core.lending import BorrowRequest, Granted, Refused, decide, offer
from extrabalance.core.protection import (
    PRESETS,
    ProtectionPolicy,
    fee_percent,
    frequency_refusal,
    resolve,
)
from extrabalance.core.reasons import Reason
from tests.core.sample import NOW, POLICY, state

H = timedelta(hours=1)


@pytest.mark.parametrize(("fee", "amount", "shown"), [
    (50, 500, "10%"), (35, 300, "11.67%"), (15, 100, "15%"), (125, 1000, "12.5%"),
    (0, 500, "0%"), (1, 3, "33.33%"), (2, 3, "66.67%"), (10, 0, "0%"),
])
def test_fee_percent_is_rounded_half_up_to_two_decimals(fee, amount, shown):
    assert fee_percent(fee, amount) == shown


@given(st.integers(0, 10**7), st.integers(1, 10**7))
def test_fee_percent_is_within_half_a_basis_point(fee, amount):
    shown = fee_percent(fee, amount)
    value = float(shown.removesuffix("%"))
    assert abs(value - 100 * fee / amount) <= 0.005 + 1e-9


CAP = ProtectionPolicy(loans_per_window_max=3, window_hours=72)
COOL = ProtectionPolicy(cooling_off_after=3, cooling_off_window_hours=24, cooling_off_hours=24)


def test_the_cap_counts_loans_in_the_rolling_window_and_says_when_it_frees():
    times = [NOW - 70 * H, NOW - 30 * H, NOW - 1 * H]
    refused = frequency_refusal(times, NOW, CAP)
    assert refused is not None and refused.reason is Reason.LOAN_CAP_REACHED
    assert refused.until == NOW + 2 * H  # the oldest leaves the 72 h window then
    assert frequency_refusal(times, NOW + 2 * H + timedelta(microseconds=1), CAP) is None
    assert frequency_refusal(times[1:], NOW, CAP) is None


def test_the_cooling_off_runs_from_the_last_loan_of_a_quick_run():
    run = [NOW - 5 * H, NOW - 3 * H, NOW - 1 * H]  # three within 24 h
    refused = frequency_refusal(run, NOW, COOL)
    assert refused is not None and refused.reason is Reason.COOLING_OFF
    assert refused.until == NOW + 23 * H
    assert frequency_refusal(run, NOW + 23 * H, COOL) is None
    spread = [NOW - 50 * H, NOW - 25 * H, NOW - 1 * H]  # three, but over 49 h
    assert frequency_refusal(spread, NOW, COOL) is None
    assert frequency_refusal(run[1:], NOW, COOL) is None


def test_presets_resolve_and_overrides_win():
    eg = resolve("eg-ntra", {"cooling_off_hours": 12})
    assert eg.preset == "eg-ntra" and eg.sms_confirm and eg.double_opt_in
    assert eg.cooling_off_hours == 12 and not eg.bulk_opt_in
    assert resolve("none", {}) == ProtectionPolicy()
    assert set(PRESETS) >= {"none", "eg-ntra", "ng-fccpc"}
    with pytest.raises(ValueError, match="unknown preset"):
        resolve("xx-none", {})
    with pytest.raises(ValueError, match="unknown keys"):
        resolve("none", {"max_loans": 3})


def test_decide_and_offer_refuse_during_the_pause_for_every_channel():
    policy = replace(POLICY, protection=COOL)
    s = replace(state(auto_advance_opt_in=True), loan_times=(NOW - 3 * H, NOW - 2 * H, NOW - H))
    for channel in ("ussd", "sms", "auto"):
        decision = decide(BorrowRequest(s.msisdn, None, channel), s, policy, NOW)
        assert isinstance(decision, Refused) and decision.reason is Reason.COOLING_OFF
    menu = offer(s, policy, NOW)
    assert not menu.eligible and menu.reason is Reason.COOLING_OFF
    later = NOW + 23 * H
    assert isinstance(decide(BorrowRequest(s.msisdn, 1, "ussd"), s, policy, later), Granted)
    # Without the rule the same history lends.
    assert isinstance(decide(BorrowRequest(s.msisdn, 1, "ussd"), s, POLICY, NOW), Granted)

