"""Every admin endpoint against a node that has played the demo story, with auth."""

from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs

from extrabalance.admin import ROUTES, AdminConfigError, AdminServer
from extrabalance.admin.server import AUTH_FAIL_LOG_INTERVAL_S, AuthFailureLog
from extrabalance.demo import A, B
from tests.admin.client import call, parse_reply, raw_call
from tests.admin.conftest import TOKEN

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADMIN_ROUTES = [(r.method, r.template.replace("{msisdn}", B)) for r in ROUTES
                if r.access == "admin"]


async def test_healthz_needs_no_token(played):
    _, _, port = played
    reply = await call(port, "GET", "/healthz")
    assert reply.status == 200 and reply.json()["status"] == "alive"


@pytest.mark.parametrize("method, path", ADMIN_ROUTES + [("GET", "/readyz"), ("GET", "/metrics")])
async def test_every_protected_route_wants_the_token(played, method, path):
    _, _, port = played
    missing = await call(port, method, path, body={} if method == "POST" else None)
    wrong = await call(port, method, path, token="nope", body={} if method == "POST" else None)
    for reply in (missing, wrong):
        assert reply.status == 401, (method, path, reply.body)
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert "error" in reply.json()


async def test_basic_auth_scheme_is_refused(played):
    _, _, port = played
    reply = await call(port, "GET", "/api/v1/stats", headers={"Authorization": f"Basic {TOKEN}"})
    assert reply.status == 401


async def test_readyz_reports_each_item(played):
    _, _, port = played
    reply = await call(port, "GET", "/readyz", token=TOKEN)
    body = reply.json()
    assert reply.status == 200 and body["ready"] is True
    assert set(body["checks"]) == {"ledger", "diameter", "smpp", "mqtt", "edr", "background"}
    assert set(body["checks"]["diameter"]["in_nodes"]) == {"in-a", "in-b"}
    assert all(v["open_peers"] for v in body["checks"]["diameter"]["in_nodes"].values())


async def test_metrics_is_prometheus_text_with_fresh_outstanding_gauge(played):
    env, _, port = played
    reply = await call(port, "GET", "/metrics", token=TOKEN)
    text = reply.body.decode()
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    totals = await env.node.ledger.account_totals()
    outstanding = totals["principal_receivable"] + totals["fee_receivable"]
    assert f"eb_outstanding_minor {float(outstanding)}" in text
    assert 'eb_loans_total{channel="ussd"} 3.0' in text
    assert 'eb_diameter_peer_up{peer="in-a.operator.example out 127.0.0.1:' in text
    assert 'eb_diameter_peer_up{peer="in-b.operator.example in 127.0.0.1:' in text
    assert "eb_smpp_bind_up{bind=" in text
    # what the gateways did beyond a clean peer (repeats, late answers, ...)
    assert 'eb_smpp_gateway_events{kind="ussd_repeats"} 0.0' in text
    assert 'eb_smpp_gateway_events{kind="timeout_resends"} 0.0' in text
    assert 'eb_smpp_gateway_events{kind="balance_checks_above_limit"}' in text
    assert 'eb_advance_answers_undelivered{kind="marked"} 0.0' in text
    assert 'eb_advance_answers_undelivered{kind="reversed"} 0.0' in text
    assert "# TYPE eb_diameter_peer_warnings gauge" in text


async def test_subscriber_view(played):
    _, _, port = played
    reply = await call(port, "GET", f"/api/v1/subscribers/{A}", token=TOKEN)
    body = reply.json()
    assert reply.status == 200
    assert body["msisdn"] == A and body["known"] is True
    # The 5.00 EGP loan he repaid, then the data bundle (tier 13) he still owes.
    assert [(loan["tier_id"], loan["state"]) for loan in body["loans"]] == [
        (4, "REPAID"), (13, "ACTIVE")]
    assert body["route"]["in_node"] == "in-a.operator.example"
    assert body["route"]["static_in_node"] == "in-a.operator.example"
    assert {"journal", "audit", "recoveries", "debt_minor"} <= set(body)
    # Limits from behaviour are on in the demo's config: a starter limit of 10.00, -5 %
    # for his partial payback, +10 % for his full one on time.
    assert (body["limit"]["limit_minor"], body["limit"]["reason"],
            body["limit"]["adjust_bp"]) == (1050, "floor", 500)


async def test_do_not_disturb_add_list_remove(played):
    _, _, port = played
    body = {"reason": "regulator's list", "who": "ops"}
    added = await call(port, "POST", f"/api/v1/dnd/{B}", token=TOKEN, body=body)
    assert added.status == 200 and added.json() == {"msisdn": B, "listed": True, "added": True}
    again = await call(port, "POST", f"/api/v1/dnd/{B}", token=TOKEN, body=body)
    assert again.json()["added"] is False
    page = (await call(port, "GET", "/api/v1/dnd?limit=10", token=TOKEN)).json()["entries"]
    assert [(e["msisdn"], e["source"], e["added_by"]) for e in page] == [(B, "admin", "ops")]
    assert (await call(port, "GET", f"/api/v1/dnd?after={B}", token=TOKEN)).json() == {
        "entries": []}
    assert (await call(port, "GET", "/api/v1/dnd?limit=0", token=TOKEN)).status == 400
    assert (await call(port, "POST", f"/api/v1/dnd/{B}", token=TOKEN, body={})).status == 400
    removed = await call(port, "POST", f"/api/v1/dnd/{B}/remove", token=TOKEN, body=body)
    assert removed.json() == {"msisdn": B, "listed": False, "removed": True}
    assert (await call(port, "GET", "/api/v1/dnd", token=TOKEN)).json() == {"entries": []}


async def test_subscriber_unknown_is_404_and_bad_msisdn_400(played):
    _, _, port = played
    assert (await call(port, "GET", "/api/v1/subscribers/209999999999", token=TOKEN)).status == 404
    assert (await call(port, "GET", "/api/v1/subscribers/12ab", token=TOKEN)).status == 400


async def test_unknown_path_404_and_wrong_method_405(played):
    _, _, port = played
    assert (await call(port, "GET", "/api/v1/nothing", token=TOKEN)).status == 404
    reply = await call(port, "DELETE", "/api/v1/stats", token=TOKEN)
    assert reply.status == 405 and reply.headers["allow"] == "GET"
    reply = await call(port, "GET", f"/api/v1/subscribers/{A}/bar", token=TOKEN)
    assert reply.status == 405 and reply.headers["allow"] == "POST"


async def test_bar_and_unbar_are_audited_and_take_effect(played):
    _, _, port = played
    path = f"/api/v1/subscribers/{A}"
    reply = await call(port, "POST", path + "/bar", token=TOKEN,
                       body={"reason": "fraud check", "who": "alice", "notify": False})
    assert reply.status == 200 and reply.json()["barred"] is True
    view = (await call(port, "GET", path, token=TOKEN)).json()
    assert view["subscriber"]["barred_manual"] == 1
    assert view["audit"][0]["action"] == "bar" and view["audit"][0]["who"] == "alice"
    reply = await call(port, "POST", path + "/unbar", token=TOKEN,
                       body={"reason": "cleared", "who": "bob"})
    assert reply.status == 200
    view = (await call(port, "GET", path, token=TOKEN)).json()
    assert view["subscriber"]["barred_manual"] == 0
    assert [(a["action"], a["who"], a["why"]) for a in view["audit"][:2]] == [
        ("unbar", "bob", "cleared"), ("bar", "alice", "fraud check")]


@pytest.mark.parametrize("body, status", [
    ({"who": "x"}, 400),  # no reason
    ({"reason": "x"}, 400),  # no who
    ({"reason": 5, "who": "x"}, 400),
    ({"reason": "x" * 501, "who": "x"}, 400),
    ([1, 2], 400),
])
async def test_bar_validates_its_body(played, body, status):
    _, _, port = played
    reply = await call(port, "POST", f"/api/v1/subscribers/{A}/bar", token=TOKEN, body=body)
    assert reply.status == status and "error" in reply.json()


async def test_malformed_json_is_400(played):
    _, _, port = played
    reply = await call(port, "POST", f"/api/v1/subscribers/{A}/bar", token=TOKEN,
                       raw_body=b'{"reason": ')
    assert reply.status == 400 and "malformed JSON" in reply.json()["error"]


async def test_adjustment_writes_debt_down_balanced_and_idempotent(played):
    env, _, port = played
    ledger = env.node.ledger
    before = (await call(port, "GET", f"/api/v1/subscribers/{B}", token=TOKEN)).json()
    body = {"kind": "waive_fee", "amount_minor": 60, "reason": "network outage goodwill",
            "who": "carol", "request_id": "ticket-42"}
    first = await call(port, "POST", f"/api/v1/subscribers/{B}/adjustments", token=TOKEN, body=body)
    again = await call(port, "POST", f"/api/v1/subscribers/{B}/adjustments", token=TOKEN, body=body)
    assert first.status == 200 and again.status == 200
    r1, r2 = first.json(), again.json()
    assert r1["debt_before_minor"] == before["debt_minor"]
    assert r1["debt_after_minor"] == before["debt_minor"] - 60
    assert r2["replayed"] is True and r2["tx_id"] == r1["tx_id"]
    # Fee first, oldest loan first: 50 from the first loan's fee, 10 from the second's.
    assert [(x["fee_minor"], x["principal_minor"]) for x in r1["loans"]] == [(50, 0), (10, 0)]
    after = (await call(port, "GET", f"/api/v1/subscribers/{B}", token=TOKEN)).json()
    assert after["debt_minor"] == before["debt_minor"] - 60
    assert after["audit"][0]["action"] == "adjust" and after["audit"][0]["who"] == "carol"
    unbalanced = await ledger.read(lambda c: c.execute(
        "SELECT tx_id FROM journal GROUP BY tx_id HAVING SUM(amount_minor) <> 0").fetchall())
    assert unbalanced == []
    cache = await ledger.read(lambda c: c.execute(
        "SELECT SUM(principal_minor - principal_repaid_minor + fee_minor - fee_repaid_minor)"
        " FROM loans WHERE msisdn = ? AND state IN ('ACTIVE', 'PARTIALLY_REPAID')", (B,)
    ).fetchone()[0])
    assert cache == after["debt_minor"]


@pytest.mark.parametrize("body, status", [
    ({"kind": "waive", "amount_minor": 10**6, "reason": "r", "who": "w"}, 409),  # > debt
    ({"kind": "credit", "amount_minor": 10, "reason": "r", "who": "w"}, 400),
    ({"kind": "waive", "amount_minor": -5, "reason": "r", "who": "w"}, 400),
    ({"kind": "waive", "amount_minor": 1.5, "reason": "r", "who": "w"}, 400),
    ({"kind": "waive", "amount_minor": True, "reason": "r", "who": "w"}, 400),
    ({"kind": "waive", "amount_minor": 10, "who": "w"}, 400),
    ({"kind": "waive", "amount_minor": 10, "reason": "r", "who": "w", "extra": 1}, 400),
    ({"kind": "waive", "amount_minor": 10, "reason": "r", "who": "w", "loan_id": "nope"}, 409),
    ({"kind": "waive", "amount_minor": 10, "reason": "r", "who": "w", "request_id": "a b"}, 400),
])
async def test_adjustment_refusals_change_nothing(played, body, status):
    env, _, port = played
    totals = await env.node.ledger.account_totals()
    reply = await call(port, "POST", f"/api/v1/subscribers/{B}/adjustments", token=TOKEN,
                       body=body)
    assert reply.status == status and "error" in reply.json()
    assert await env.node.ledger.account_totals() == totals


async def test_peers_and_binds(played):
    _, _, port = played
    peers = (await call(port, "GET", "/api/v1/peers", token=TOKEN)).json()["peers"]
    assert {p["state"] for p in peers} == {"Open"}
    assert {p["direction"] for p in peers} == {"in", "out"}
    binds = (await call(port, "GET", "/api/v1/binds", token=TOKEN)).json()["binds"]
    assert len(binds) == 1 and binds[0]["bound"] is True


async def test_stats_figures_match_the_ledger(played):
    env, _, port = played
    stats = (await call(port, "GET", "/api/v1/stats", token=TOKEN)).json()
    totals = await env.node.ledger.account_totals()
    assert stats["outstanding_minor"] == totals["principal_receivable"] + totals["fee_receivable"]
    assert stats["lent_minor"] == 2200 and stats["fees_minor"] == 230  # with the data bundle
    assert stats["recovered_minor"] == 550
    assert stats["recovery_rate"] == round(550 / 2430, 4)
    # USSD menu refusals (the ceiling, then the bar) count like the others.
    assert stats["refusals_by_reason"] == {"BARRED_BAD_DEBT": 2, "CEILING_REACHED": 1,
                                           "NOT_OPTED_IN": 1}
    assert set(stats["rates_per_s"]) == {"loans", "paybacks", "ads"}
    assert stats["peers_open"] >= 2 and stats["binds_bound"] == 1


async def test_read_only_mode_without_a_token(played):
    env, _, _ = played
    ro = AdminServer(env.node, token="", port=0)
    port = await ro.start()
    try:
        assert (await call(port, "GET", "/healthz")).status == 200
        assert (await call(port, "GET", "/readyz")).status == 200
        assert (await call(port, "GET", "/metrics")).status == 200
        for method, path in ADMIN_ROUTES:
            reply = await call(port, method, path, token="anything",
                               body={} if method == "POST" else None)
            assert reply.status == 403, (method, path)
            assert "read-only" in reply.json()["error"]
    finally:
        await ro.close()


async def test_no_token_on_a_public_address_refuses_to_start(played):
    env, _, _ = played
    with pytest.raises(AdminConfigError, match="loopback"):
        AdminServer(env.node, token="", host="0.0.0.0", port=0)
    AdminServer(env.node, token="x", host="0.0.0.0", port=0)  # with a token it may


async def test_token_from_file(played, tmp_path):
    env, _, _ = played
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    settings = env.node.settings.model_copy(update={
        "admin": env.node.settings.admin.model_copy(
            update={"token_env": None, "token_file": str(secret)})})
    node_settings, env.node.settings = env.node.settings, settings
    try:
        admin = AdminServer(env.node, port=0)
    finally:
        env.node.settings = node_settings
    port = await admin.start()
    try:
        assert (await call(port, "GET", "/api/v1/stats", token="from-file")).status == 200
        assert (await call(port, "GET", "/api/v1/stats", token="from-fil")).status == 401
    finally:
        await admin.close()


async def test_status_page_is_served_without_data(played):
    _, _, port = played
    reply = await call(port, "GET", "/status")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in reply.headers["content-security-policy"]
    assert b"/api/v1/stats" in reply.body and json.dumps(TOKEN).encode() not in reply.body


# -- hardening (issue 22) ----------------------------------------------------------

async def test_auth_failures_are_throttled_and_carry_no_msisdn(played):
    _env, admin, port = played
    admin.auth_failures = AuthFailureLog()  # forget the failures earlier tests made
    msisdn = "201001234567"
    with capture_logs() as logs:
        for _ in range(20):
            reply = await call(port, "GET", f"/api/v1/subscribers/{msisdn}", token="wrong")
            assert reply.status == 401
    lines = [e for e in logs if e["event"] == "admin_auth_failed"]
    assert len(lines) == 1, lines
    assert msisdn not in json.dumps(lines, default=str)
    assert lines[0]["route"] == "/api/v1/subscribers/{msisdn}"


async def test_auth_failure_log_counts_what_it_held_back():
    now = [1000.0]
    flog = AuthFailureLog(clock=lambda: now[0])
    with capture_logs() as logs:
        for _ in range(5):
            flog.failed("10.0.0.1:5555", "/api/v1/stats")
        now[0] += AUTH_FAIL_LOG_INTERVAL_S
        flog.failed("10.0.0.1:6666", "/api/v1/stats")
    assert [e["failures"] for e in logs] == [1, 5]


async def test_pages_refuse_to_be_framed(played):
    _, _, port = played
    for path in ("/", "/status"):
        reply = await call(port, "GET", path)
        assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
        assert reply.headers["x-frame-options"] == "DENY"


async def test_duplicate_authorization_is_refused_by_the_admin_api(played):
    _, _, port = played
    raw = (f"GET /api/v1/stats HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\n"
           f"Authorization: Bearer {TOKEN}\r\n\r\n").encode()
    assert parse_reply(await raw_call(port, raw)).status == 400



async def test_auto_advance_opt_in_and_out_are_audited_and_take_effect(played):
    _, _, port = played
    path = f"/api/v1/subscribers/{A}"
    reply = await call(port, "POST", path + "/auto-advance", token=TOKEN,
                       body={"enabled": True, "reason": "asked at the shop", "who": "carol"})
    assert reply.status == 200
    assert (reply.json()["auto_advance"], reply.json()["changed"]) == (True, True)
    view = (await call(port, "GET", path, token=TOKEN)).json()
    assert view["subscriber"]["auto_advance_opt_in"] == 1
    assert (view["audit"][0]["action"], view["audit"][0]["who"], view["audit"][0]["why"]) == (
        "auto_advance_on", "carol", "asked at the shop")
    again = await call(port, "POST", path + "/auto-advance", token=TOKEN,
                       body={"enabled": True, "reason": "again", "who": "carol"})
    assert again.status == 200 and again.json()["changed"] is False
    reply = await call(port, "POST", path + "/auto-advance", token=TOKEN,
                       body={"enabled": False, "reason": "called the hotline", "who": "dan"})
    assert reply.status == 200 and reply.json()["changed"] is True
    view = (await call(port, "GET", path, token=TOKEN)).json()
    assert view["subscriber"]["auto_advance_opt_in"] == 0
    assert [a["action"] for a in view["audit"][:2]] == ["auto_advance_off", "auto_advance_on"]


@pytest.mark.parametrize("body", [
    {"reason": "x", "who": "y"},  # no enabled
    {"enabled": "yes", "reason": "x", "who": "y"},
    {"enabled": True, "who": "y"},
    {"enabled": True, "reason": "x"},
    {"enabled": True, "reason": "x", "who": "y", "notify": True},
])
async def test_auto_advance_validates_its_body(played, body):
    _, _, port = played
    reply = await call(port, "POST", f"/api/v1/subscribers/{A}/auto-advance", token=TOKEN,
                       body=body)
    assert reply.status == 400 and "error" in reply.json()


async def test_peer_warnings_are_on_metrics_by_peer_and_kind(played):
    env, _, port = played
    env.node.diameter.warnings.warn("in-a.operator.example", "late_answer", "test")
    text = (await call(port, "GET", "/metrics", token=TOKEN)).body.decode()
    assert ('eb_diameter_peer_warnings{kind="late_answer",peer="in-a.operator.example"} 1.0'
            in text)


async def test_consent_trail_of_a_subscriber_is_exported(played):
    """GET .../consents: his consent lines, oldest first, the same as the CLI export."""
    _, _, port = played
    path = f"/api/v1/subscribers/{B}"
    for enabled, who in ((True, "erin"), (False, "frank")):
        reply = await call(port, "POST", path + "/auto-advance", token=TOKEN,
                           body={"enabled": enabled, "reason": "by phone", "who": who})
        assert reply.status == 200
    reply = await call(port, "GET", path + "/consents", token=TOKEN)
    assert reply.status == 200 and reply.json()["msisdn"] == B
    lines = [(c["action"], c["who"], c["why"]) for c in reply.json()["consents"]]
    assert lines[-2:] == [("auto_advance_on", "erin", "by phone"),
                          ("auto_advance_off", "frank", "by phone")]
    assert (await call(port, "GET", path + "/consents")).status == 401
    assert (await call(port, "GET", "/api/v1/subscribers/12ab/consents", token=TOKEN)).status == 400
