"""Property: over a random day of events no subscriber gets more ads than the caps
allow — whatever the triggers, times (quiet hours included), opt-outs and bars.

Runs the real transaction (`decide_and_record`) on an in-memory SQLite ledger with
the real schema, so the store's 24-hour look-back is part of what is tested."""

import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extrabalance.ledger import store
from extrabalance.ledger.db import migrate
from extrabalance.ledger.sqlite_uow import SqliteLedgerTx
from extrabalance.service.ads import AdPolicy, AdRequest, AdTrigger, decide_and_record
from tests.ads.conftest import RULES
from tests.core.sample import POLICY

SUBSCRIBERS = ("201001000001", "201001000002", "201001000003")
DAY_START = datetime(2026, 11, 25, 0, 0, tzinfo=UTC)
SPAN_S = 36 * 3600  # a day and a half, so windows straddle midnight

event = st.tuples(
    st.integers(0, SPAN_S),  # seconds after DAY_START
    st.sampled_from(SUBSCRIBERS),
    st.sampled_from(["ad"] * 6 + ["opt_out", "opt_in", "bar", "unbar"]),
    st.sampled_from(list(AdTrigger)),
)


def fresh_conn():
    conn = sqlite3.connect(":memory:", isolation_level=None, factory=SqliteLedgerTx)
    migrate(conn)
    now = DAY_START
    for m in SUBSCRIBERS:
        conn.execute("INSERT INTO subscribers (msisdn, tenure_days, arpu_minor, updated_at)"
                     " VALUES (?, 400, 6000, ?)", (m, store.ts(now)))
    return conn


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(event, max_size=80),
    max_per_day=st.integers(0, 4),
    min_interval_s=st.sampled_from([0, 60, 1800, 3600, 7200]),
    low_cap=st.integers(0, 3),
    rate=st.integers(1, 5),
)
def test_no_subscriber_gets_more_than_the_caps(events, max_per_day, min_interval_s, low_cap, rate):
    rules = replace(RULES, max_per_day=max_per_day, min_interval_s=min_interval_s,
                    trigger_max_per_day={AdTrigger.LOW_BALANCE: low_cap})
    ads = AdPolicy(rules)
    conn = fresh_conn()
    opted_out = dict.fromkeys(SUBSCRIBERS, False)
    barred = dict.fromkeys(SUBSCRIBERS, False)
    tokens_per_second: dict[int, int] = {}
    sent: list[tuple[datetime, str, AdTrigger]] = []
    for offset_s, msisdn, action, trigger in sorted(events, key=lambda e: e[0]):
        now = DAY_START + timedelta(seconds=offset_s)
        if action in ("opt_out", "opt_in"):
            opted_out[msisdn] = action == "opt_out"
            store.set_preferences(conn, msisdn, now, ads_opt_out=opted_out[msisdn])
            continue
        if action in ("bar", "unbar"):
            barred[msisdn] = action == "bar"
            store.set_bar(conn, msisdn, barred[msisdn], "test", "test", now)
            continue

        def take_token(second=offset_s) -> bool:  # a per-second budget of `rate`
            used = tokens_per_second.get(second, 0)
            if used >= rate:
                return False
            tokens_per_second[second] = used + 1
            return True

        conn.execute("BEGIN")
        decision = decide_and_record(conn, ads, POLICY, AdRequest(msisdn, trigger), now,
                                     take_token=take_token)
        conn.execute("COMMIT")
        if decision.verdict.send:
            assert not opted_out[msisdn], "ad to an opted-out subscriber"
            assert not barred[msisdn], "ad to a barred subscriber"
            assert not ads.in_quiet_hours(now), "ad in quiet hours"
            sent.append((now, msisdn, trigger))
        else:
            assert decision.verdict.reason in {"opted_out", "barred", "quiet_hours", "cap_day",
                                               "cap_trigger", "cap_interval", "rate"}

    recorded = conn.execute("SELECT COUNT(*) FROM ads_sent").fetchone()[0]
    assert recorded == len(sent)
    for msisdn in SUBSCRIBERS:
        mine = [(t, trig) for t, m, trig in sent if m == msisdn]
        for i, (t, _) in enumerate(mine):
            window = [x for x in mine if t - timedelta(hours=24) < x[0] <= t]
            assert len(window) <= max_per_day
            low = [x for x in window if x[1] is AdTrigger.LOW_BALANCE]
            assert len(low) <= low_cap
            if i:
                assert (t - mine[i - 1][0]).total_seconds() >= min_interval_s
    assert all(used <= rate for used in tokens_per_second.values())
