"""Traffic mix, latency sample and MSISDN pools (pure parts of simulators/traffic.py)."""

from __future__ import annotations

import random

import pytest

from simulators.traffic import Latencies, TrafficConfig, TrafficMix, expand_msisdns


def test_mix_parse_and_pick() -> None:
    mix = TrafficMix.parse("ussd_menu=1,recharge=3")
    assert (mix.ussd_menu, mix.recharge, mix.sms_loan) == (1.0, 3.0, 0.0)
    rng = random.Random(0)
    picks = [mix.pick(rng) for _ in range(4000)]
    assert set(picks) == {"ussd_menu", "recharge"}
    assert 2700 < picks.count("recharge") < 3300
    with pytest.raises(ValueError):
        TrafficMix.parse("nonsense=1")
    with pytest.raises(ValueError):
        TrafficMix(0, 0, 0, 0, 0)


def test_latency_percentiles_and_bound() -> None:
    lat = Latencies(samples_max=100)
    for v in range(1, 1001):
        lat.add(float(v))
    assert len(lat) == 1000 and len(lat.samples()) == 100
    exact = Latencies()
    for v in range(1, 101):
        exact.add(float(v))
    assert (exact.percentile(50), exact.percentile(95), exact.percentile(99)) == (50.0, 95.0, 99.0)
    assert Latencies().percentile(50) is None


def test_expand_msisdns() -> None:
    assert expand_msisdns("201000000009-201000000011") == [
        "201000000009", "201000000010", "201000000011"
    ]
    assert expand_msisdns("1,2") == ["1", "2"]
    with pytest.raises(ValueError):
        expand_msisdns("10-9")


def test_config_needs_an_end() -> None:
    with pytest.raises(ValueError):
        TrafficConfig(msisdns=["1"], duration_s=None, operations_max=None)
