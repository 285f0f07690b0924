"""Config reload through the admin API while USSD dialogs run through the simulators:
good files apply at once, bad files answer 400 (file, key, reason) and change nothing,
and no dialog is dropped either way."""

from __future__ import annotations

import asyncio
import re

import pytest
import pytest_asyncio

from extrabalance.admin import AdminServer
from extrabalance.config import default_config_text
from extrabalance.demo import demo_env
from extrabalance.ledger.profiles import import_profiles
from tests.admin.client import call

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "reload-token"
SUBSCRIBERS = 24
ROUNDS = 2
STANDARD_FEE = "[fee_plans.standard]\npercent_bp = 1000"
RESTART_SECTIONS = ("node", "storage", "diameter", "in_nodes", "smpp", "mqtt", "admin")


def config_text(*, fee_bp: int = 1000, broken: bool = False) -> str:
    text = default_config_text()
    assert STANDARD_FEE in text
    text = text.replace(STANDARD_FEE, f"[fee_plans.standard]\npercent_bp = {fee_bp}")
    if broken:
        text = text.replace('fee_plan = "flat"', 'fee_plan = "no-such-plan"')
    return text


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def net(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reload")
    config = workdir / "extrabalance.toml"
    config.write_text(config_text())
    async with demo_env(workdir) as env:
        dumped = env.node.settings.model_dump(mode="json")
        # The demo's ports and paths, as a deployment's file would hold them.
        overrides = {name: dumped[name] for name in RESTART_SECTIONS}
        # ... and the demo's limits from behaviour (on in the demo's config only).
        overrides["limits"] = dumped["limits"]
        admin = AdminServer(env.node, token=TOKEN, port=0, config_path=config,
                            config_overrides=overrides)
        port = await admin.start()
        msisdns = [f"2010012{i:05d}" for i in range(SUBSCRIBERS)]
        profiles = workdir / "load.csv"
        profiles.write_text("msisdn,tenure_days,arpu_minor\n"
                            + "".join(f"{m},400,5000\n" for m in msisdns))
        assert not import_profiles(workdir / "extrabalance.db", profiles, progress=False).bad_rows
        for m in msisdns:
            env.in_sim.set_balance(m, 0)
        try:
            yield env, admin, port, config, msisdns
        finally:
            await admin.close()


async def test_bad_config_is_400_with_file_key_reason_and_changes_nothing(net):
    env, _, port, config, _ = net
    config.write_text(config_text(broken=True))
    before = env.node.settings
    reply = await call(port, "POST", "/api/v1/config/reload", token=TOKEN)
    body = reply.json()
    assert reply.status == 400
    assert body["file"] == str(config)
    assert any(p["key"] == "(top level)" or p["key"].startswith("segments") for p in body["problems"])
    assert any("no-such-plan" in p["reason"] for p in body["problems"])
    assert env.node.settings is before
    config.write_text("this is [not toml")
    reply = await call(port, "POST", "/api/v1/config/reload", token=TOKEN)
    assert reply.status == 400 and reply.json()["problems"][0]["key"] == "(syntax)"
    config.write_text(config_text())


async def test_good_config_applies_and_names_what_changed(net):
    env, _, port, config, _ = net
    # Baseline: the file as written (the demo environment may differ from it, e.g. in
    # its ads section), so that the next reload shows only the fee change.
    config.write_text(config_text())
    assert (await call(port, "POST", "/api/v1/config/reload", token=TOKEN)).status == 200
    config.write_text(config_text(fee_bp=2000))
    reply = await call(port, "POST", "/api/v1/config/reload", token=TOKEN)
    assert reply.status == 200, reply.body
    assert reply.json() == {"changed": ["fee_plans"], "needs_restart": []}
    assert env.node.policy.fee_plans["standard"].percent_bp == 2000
    config.write_text(config_text())
    reply = await call(port, "POST", "/api/v1/config/reload", token=TOKEN)
    assert reply.json()["changed"] == ["fee_plans"]


async def test_restart_only_sections_are_reported_and_kept(net):
    env, admin, port, _, _ = net
    saved = admin.config_overrides
    admin.config_overrides = {**saved, "mqtt": {**saved["mqtt"], "client_id": "other"}}
    try:
        reply = await call(port, "POST", "/api/v1/config/reload", token=TOKEN)
        assert reply.json() == {"changed": ["mqtt"], "needs_restart": ["mqtt"]}
        assert env.node.settings.mqtt.client_id == saved["mqtt"]["client_id"]
    finally:
        admin.config_overrides = saved


async def test_reloads_under_ussd_load_drop_no_dialog(net):
    env, _, port, config, msisdns = net
    finals: dict[str, list[str]] = {m: [] for m in msisdns}
    done = asyncio.Event()

    async def subscriber(msisdn: str) -> None:
        phone = env.smsc.handset(msisdn)
        for _ in range(ROUNDS):
            menu = await phone.dial("*123#", timeout_s=10)
            assert not menu.final, menu.text
            confirm = await phone.reply("1", timeout_s=10)
            assert not confirm.final, confirm.text
            final = await phone.reply("1", timeout_s=10)
            for _ in range(5):  # a fee changed by a reload is shown again before lending
                if final.final:
                    break
                assert final.text.startswith("Borrow "), final.text
                final = await phone.reply("1", timeout_s=10)
            assert final.final
            finals[msisdn].append(final.text)

    async def reloader() -> list[int]:
        statuses = []
        flip = 0
        while not done.is_set():
            flip += 1
            config.write_text(config_text(fee_bp=2000 if flip % 2 else 1000, broken=flip % 3 == 0))
            statuses.append((await call(port, "POST", "/api/v1/config/reload", token=TOKEN)).status)
            await asyncio.sleep(0.005)
        return statuses

    reloads = asyncio.create_task(reloader())
    try:
        await asyncio.gather(*(subscriber(m) for m in msisdns))
    finally:
        done.set()
        statuses = await reloads
        config.write_text(config_text())
    assert 200 in statuses and 400 in statuses and set(statuses) <= {200, 400}
    # Every dialog ended on its "Done" screen: none dropped, none refused.
    for msisdn, texts in finals.items():
        assert len(texts) == ROUNDS, msisdn
        assert all(t.startswith("Done: 1.00 EGP added") for t in texts), (msisdn, texts)
    fees = await env.node.ledger.read(lambda c: c.execute(
        "SELECT fee_minor, COUNT(*) FROM loans WHERE msisdn LIKE '2010012%' AND state = 'ACTIVE'"
        " GROUP BY fee_minor").fetchall())
    assert sum(n for _, n in fees) == SUBSCRIBERS * ROUNDS
    assert {fee for fee, _ in fees} <= {10, 20}  # the fee plan of one config or the other
    # What the final screen says is owed is what the journal says.
    for msisdn, texts in finals.items():
        m = re.search(r"You owe (\d+)\.(\d\d) EGP", texts[-1])
        assert m, texts[-1]
        owed = int(m.group(1)) * 100 + int(m.group(2))
        view = await env.node.ledger.subscriber_view(msisdn)
        assert view["debt_minor"] == owed
    unbalanced = await env.node.ledger.read(lambda c: c.execute(
        "SELECT tx_id FROM journal GROUP BY tx_id HAVING SUM(amount_minor) <> 0").fetchall())
    assert unbalanced == []


async def test_fee_charged_is_the_fee_shown_across_a_reload(net):
    """A reload between the confirm screen and the subscriber's '1' shows him the new
    fee and asks again; he is never charged a fee he was not shown."""
    env, _, port, config, msisdns = net
    msisdn = msisdns[0]
    # He spent what earlier tests lent him: the balance rule (max_balance_to_borrow_minor,
    # asked of the IN before each loan) lets him borrow however many loans they made.
    env.in_sim.set_balance(msisdn, 0)
    phone = env.smsc.handset(msisdn)
    fees = lambda c: dict(c.execute(
        "SELECT loan_id, fee_minor FROM loans WHERE msisdn = ?", (msisdn,)).fetchall())
    count_loans = lambda c: len(fees(c))
    before = await env.node.ledger.read(fees)
    loans_before = len(before)
    config.write_text(config_text(fee_bp=1000))
    assert (await call(port, "POST", "/api/v1/config/reload", token=TOKEN)).status == 200
    await phone.dial("*123#", timeout_s=10)
    confirm = await phone.reply("1", timeout_s=10)
    assert "Fee 0.10 EGP (10%)" in confirm.text
    config.write_text(config_text(fee_bp=2000))
    assert (await call(port, "POST", "/api/v1/config/reload", token=TOKEN)).status == 200
    try:
        again = await phone.reply("1", timeout_s=10)
        assert not again.final and "Fee 0.20 EGP (20%)" in again.text
        assert await env.node.ledger.read(count_loans) == loans_before
        done = await phone.reply("1", timeout_s=10)
        assert done.final, done.text
    finally:
        config.write_text(config_text())
        await call(port, "POST", "/api/v1/config/reload", token=TOKEN)
    # The loan this dialog made (timestamps can tie under a test clock: compare sets).
    # The final screen may go out on the IN's word before its commit: wait for the row.
    new: dict[str, int] = {}
    for _ in range(500):
        after = await env.node.ledger.read(fees)
        new = {loan: fee for loan, fee in after.items() if loan not in before}
        if new:
            break
        await asyncio.sleep(0.01)
    assert list(new.values()) == [20]
