"""AdPolicy as a pure function: each rule, in order, and the template choice."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from extrabalance.service.ads import AdPolicy, AdSubject, AdTrigger, SentAd, TokenBucket
from tests.ads.conftest import RULES

NOON_CAIRO = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
M = "201001234567"
OOB = AdTrigger.OUT_OF_BALANCE


def decide(subject=None, trigger=OOB, history=(), now=NOON_CAIRO, rules=RULES, **kw):
    return AdPolicy(rules).decide(subject or AdSubject(M), trigger, list(history), now, **kw)


def test_sends_with_trigger_template():
    v = decide()
    assert v.send and v.reason == "" and v.template == "ad_out_of_balance"


@pytest.mark.parametrize("trigger", list(AdTrigger))
def test_each_trigger_has_its_template(trigger):
    assert decide(trigger=trigger).template == f"ad_{trigger.value}"


def test_segment_override_template():
    assert decide(AdSubject(M, segment="gold")).template == "ad_out_of_balance_vip"
    assert decide(AdSubject(M, segment="standard")).template == "ad_out_of_balance"
    # only the base named in the override table changes
    assert decide(AdSubject(M, segment="gold"), AdTrigger.LOW_BALANCE).template == "ad_low_balance"


def test_disabled_globally_and_per_trigger():
    assert decide(rules=replace(RULES, enabled=False)).reason == "disabled"
    off = replace(RULES, triggers_disabled=frozenset({AdTrigger.LOW_BALANCE}))
    assert decide(trigger=AdTrigger.LOW_BALANCE, rules=off).reason == "disabled"
    assert decide(rules=off).send


def test_opted_out():
    assert decide(AdSubject(M, opted_out=True)).reason == "opted_out"


def test_barred():
    assert decide(AdSubject(M, barred=True)).reason == "barred"


@pytest.mark.parametrize(
    "utc_hour, utc_minute, quiet",
    [(19, 59, False), (20, 0, True), (23, 0, True), (5, 59, True), (6, 0, False), (10, 0, False)],
)
def test_quiet_hours_in_operator_time_zone(utc_hour, utc_minute, quiet):
    # Cairo is UTC+2 in November: quiet 22:00-08:00 local = 20:00-06:00 UTC.
    now = datetime(2026, 11, 25, utc_hour, utc_minute, tzinfo=UTC)
    assert (decide(now=now).reason == "quiet_hours") is quiet


def test_quiet_hours_not_crossing_midnight_and_empty():
    day = replace(RULES, quiet_start_min=13 * 60, quiet_end_min=14 * 60)
    assert decide(now=datetime(2026, 11, 25, 11, 30, tzinfo=UTC), rules=day).reason == "quiet_hours"
    assert decide(now=datetime(2026, 11, 25, 12, 0, tzinfo=UTC), rules=day).send
    empty = replace(RULES, quiet_start_min=600, quiet_end_min=600)
    assert decide(now=datetime(2026, 11, 25, 1, 0, tzinfo=UTC), rules=empty).send


def test_cap_day_counts_any_24_hours():
    two = [SentAd(NOON_CAIRO - timedelta(hours=20), OOB), SentAd(NOON_CAIRO - timedelta(hours=3), OOB)]
    assert decide(history=two).reason == "cap_day"
    # the older one leaves the window a second after 24 h
    later = NOON_CAIRO + timedelta(hours=4, seconds=1)
    assert decide(history=two, now=later).send


def test_cap_trigger():
    one_low = [SentAd(NOON_CAIRO - timedelta(hours=5), AdTrigger.LOW_BALANCE)]
    assert decide(trigger=AdTrigger.LOW_BALANCE, history=one_low).reason == "cap_trigger"
    assert decide(trigger=OOB, history=one_low).send  # other triggers still have room


def test_cap_interval():
    recent = [SentAd(NOON_CAIRO - timedelta(minutes=59), OOB)]
    assert decide(history=recent).reason == "cap_interval"
    assert decide(history=[SentAd(NOON_CAIRO - timedelta(minutes=60), OOB)]).send


def test_reason_order_opt_out_before_quiet_hours_before_caps():
    night = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)
    full = [SentAd(night - timedelta(minutes=1), OOB)] * 2
    assert decide(AdSubject(M, opted_out=True, barred=True), history=full, now=night).reason == "opted_out"
    assert decide(AdSubject(M, barred=True), history=full, now=night).reason == "barred"
    assert decide(history=full, now=night).reason == "quiet_hours"


def test_debt_limit_crossing():
    p = AdPolicy(RULES)  # 80 % of the ceiling
    assert p.debt_limit_crossed(12000, 9000, 9600)
    assert p.debt_limit_crossed(12000, 0, 12000)
    assert not p.debt_limit_crossed(12000, 9600, 11000)  # already above: no new ad
    assert not p.debt_limit_crossed(12000, 1000, 9599)


def test_token_bucket():
    t = [0.0]
    bucket = TokenBucket(10, burst=2, monotonic=lambda: t[0])
    assert bucket.take() and bucket.take() and not bucket.take()
    assert bucket.wait_s() == pytest.approx(0.1)
    t[0] += 0.1
    assert bucket.take() and not bucket.take()
    t[0] += 100  # saved tokens never exceed the burst
    assert sum(bucket.take() for _ in range(10)) == 2
    with pytest.raises(ValueError):
        TokenBucket(0)
