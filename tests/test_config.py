"""The config fails at start with the file, the key and what is wrong."""

import filecmp
from pathlib import Path

import pytest

from extrabalance.config import ConfigError, default_config_text, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_is_the_embedded_default():
    assert filecmp.cmp(ROOT / "config/extrabalance.toml",
                       ROOT / "extrabalance/defaults/extrabalance.toml", shallow=False)


def test_default_policy_has_twelve_tiers_and_segments():
    policy = load_settings().policy()
    assert len(policy.tiers) >= 12
    assert [s.name for s in policy.segments] == ["vip", "regular", "basic"]


def write(tmp_path, text):
    path = tmp_path / "eb.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"eb.toml: not valid TOML"):
        load_settings(write(tmp_path, "[node\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    "old, new, key, words",
    [
        ('percent_bp = 1000                  # 10 %', 'percent_bp = "ten"', "fee_plans.standard.percent_bp", "integer"),
        ('fee_plan = "standard"\nbad_debt_limit = 4', 'fee_plan = "gold"\nbad_debt_limit = 4', "", "no fee plan named 'gold'"),
        ('[[tiers]]\nid = 12\namount_minor = 5000\n', '', "", "at least 12 required"),
        ('currency = "EGP"', 'currency = "egp"', "node.currency", "pattern"),
        ('listen_host = "127.0.0.1"\nlisten_port = 3868', 'listen_host = "0.0.0.0"\nlisten_port = 3868', "", "allow_unauthenticated_public_listener"),
        ('ranges = [{ start = "201000000000", end = "201049999999" }]', 'ranges = [{ start = "2019", end = "2010" }]', "in_nodes.0.ranges.0", "empty"),
        ('mask_msisdn_in_logs = true', 'mask_msisdn_in_logs = true\ncolour = "blue"', "node.colour", "Extra inputs"),
    ],
)
def test_bad_values_name_the_key(tmp_path, old, new, key, words):
    text = default_config_text()
    assert old in text, old
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text.replace(old, new, 1)))
    message = str(info.value)
    assert "eb.toml: invalid configuration" in message
    assert key in message and words in message


def test_secret_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("EB_SMPP_PASSWORD", "s3cret")
    assert load_settings().smpp.binds[0].password() == "s3cret"
    assert "s3cret" not in default_config_text()


def test_idempotency_retention_default_and_bounds(tmp_path):
    assert load_settings().storage.idempotency_retention_hours == 240
    text = default_config_text()
    old = "idempotency_retention_hours = 240"
    assert old in text
    for hours, words in ((24, "shorter than the 192 hours minimum"),
                         (1_000_000, "maximum"), ('"ten days"', "integer")):
        with pytest.raises(ConfigError) as info:
            load_settings(write(tmp_path,
                                text.replace(old, f"idempotency_retention_hours = {hours}")))
        message = str(info.value)
        assert "storage.idempotency_retention_hours" in message and words in message
    assert load_settings(write(tmp_path, text.replace(old, "idempotency_retention_hours = 192"))
                         ).storage.idempotency_retention_hours == 192


def test_idempotency_retention_outlasts_the_mqtt_session():
    """A recharge the broker redelivers after a restart must still find its key."""
    from extrabalance.config import IDEMPOTENCY_RETENTION_HOURS_MIN
    from extrabalance.recharge.listener import MqttSettings

    session_hours = MqttSettings(host="127.0.0.1").session_expiry_s / 3600
    assert IDEMPOTENCY_RETENTION_HOURS_MIN >= session_hours + 24


def test_smpp_password_source_names_an_unset_variable(monkeypatch):
    from extrabalance.config import BindSection

    monkeypatch.delenv("EB_TEST_SMPP_PW", raising=False)
    bind = BindSection(system_id="eb", password_env="EB_TEST_SMPP_PW")
    assert bind.password_source() == "environment variable EB_TEST_SMPP_PW, which is not set"
    monkeypatch.setenv("EB_TEST_SMPP_PW", "x")
    assert bind.password_source() == "environment variable EB_TEST_SMPP_PW"


def test_protection_presets_load_with_the_shipped_templates(tmp_path):
    base = load_settings().policy().protection
    assert base.preset == "none" and base.recovery_sms and not base.sms_confirm
    text = default_config_text()
    for preset in ("eg-ntra", "ng-fccpc"):
        changed = text.replace('preset = "none"', f'preset = "{preset}"', 1)
        protection = load_settings(write(tmp_path, changed)).policy().protection
        assert protection.preset == preset and protection.fee_percent_required
        assert protection.double_opt_in and not protection.bulk_opt_in
    overridden = text.replace('preset = "none"', 'preset = "eg-ntra"\ncooling_off_after = 0', 1)
    assert load_settings(write(tmp_path, overridden)).policy().protection.cooling_off_after == 0


@pytest.mark.parametrize("old, new, words", [
    ('preset = "none"', 'preset = "fr-cnil"', "unknown preset 'fr-cnil'"),
    ('preset = "none"', 'preset = "none"\nmax_loans = 3', "Extra inputs"),
    ('confirm = "Borrow {amount}? Fee {fee} ({fee_percent}).', 'confirm = "Borrow {amount}? Fee {fee}.',
     "templates.en.confirm: protection preset 'eg-ntra' shows the fee as an amount and a percentage"),
])
def test_protection_mistakes_name_the_key(tmp_path, old, new, words):
    text = default_config_text().replace('preset = "none"', 'preset = "eg-ntra"', 1)
    old = old.replace('preset = "none"', 'preset = "eg-ntra"')
    new = new.replace('preset = "none"', 'preset = "eg-ntra"')
    assert old in text, old
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text.replace(old, new, 1)))
    assert words in str(info.value)


def test_saga_lease_is_bounded_and_sets_how_often_the_resolver_renews() -> None:
    from pydantic import ValidationError

    from extrabalance.config import StorageSection
    from extrabalance.service.resolver import resolve_interval_s

    assert StorageSection().saga_lease_s == 120
    assert StorageSection(saga_lease_s=8).saga_lease_s == 8
    for bad in (3, 3601):
        with pytest.raises(ValidationError):
            StorageSection(saga_lease_s=bad)
    # Renewed every 30 s, or every quarter of a shorter lease.
    assert resolve_interval_s(120) == 30 and resolve_interval_s(8) == 2


BUNDLE_TIER = ('[[tiers]]\nid = 13\namount_minor = 1000\n'
               'bundle = { kind = "data", quantity = 524288000, rating_group = 10 }\n')


def test_a_bundle_tier_loads_and_its_mistakes_are_named(tmp_path):
    text = default_config_text().replace("[fee_plans.standard]",
                                         BUNDLE_TIER + "\n[fee_plans.standard]", 1)
    tier = load_settings(write(tmp_path, text)).policy().tiers[13]
    assert (tier.kind, tier.amount_minor, tier.bundle.quantity) == ("data", 1000, 524288000)
    assert load_settings().policy().tiers[1].bundle is None  # none shipped
    for old, new, words in (
        (", rating_group = 10 }", " }", "service_identifier or rating_group"),
        ('kind = "data"', 'kind = "video"', "tiers.12.bundle.kind"),
        ("", "", "auto_advance.tier: tier 13 is a bundle"),
    ):
        changed = default_config_text().replace(
            "[fee_plans.standard]", BUNDLE_TIER.replace(old, new) + "\n[fee_plans.standard]", 1)
        if not old:
            changed = changed.replace("\ntier = 3 ", "\ntier = 13 ", 1)
        with pytest.raises(ConfigError) as info:
            load_settings(write(tmp_path, changed))
        assert words in str(info.value), (words, str(info.value))
