"""check-config asks what `run` needs: secrets present and within SMPP's limits, a
ledger path that can be created; a literal password is refused naming the keys to use;
a backend the node does not have is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from extrabalance import cli
from extrabalance.config import ConfigError, default_config_text, load_settings
from extrabalance.preflight import runtime_problems

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, text: str | None = None, ledger: Path | None = None) -> Path:
    text = text or default_config_text()
    text = text.replace('path = "var/extrabalance.db"',
                        f'path = "{ledger or tmp_path / "ledger.db"}"')
    path = tmp_path / "eb.toml"
    path.write_text(text)
    return path


def _check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["check-config", "--config", str(config)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_ok_with_the_password_set(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EB_SMPP_PASSWORD", "pw123456")
    code, text = _check(_config(tmp_path), capsys)
    assert code == 0 and "OK" in text


def test_missing_smpp_password_env(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("EB_SMPP_PASSWORD", raising=False)
    code, text = _check(_config(tmp_path), capsys)
    assert code == 2 and "EB_SMPP_PASSWORD" in text and "not set" in text


def test_smpp_password_longer_than_8(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EB_SMPP_PASSWORD", "123456789")
    code, text = _check(_config(tmp_path), capsys)
    assert code == 2 and "longer than 8" in text


def test_storage_path_that_cannot_be_created(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EB_SMPP_PASSWORD", "pw123456")
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, text = _check(_config(tmp_path, ledger=blocker / "sub" / "ledger.db"), capsys)
    assert code == 2 and "storage.path" in text and "not a directory" in text


def test_storage_path_that_is_a_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EB_SMPP_PASSWORD", "pw123456")
    settings = load_settings(_config(tmp_path, ledger=tmp_path))
    assert any("is a directory" in p for p in runtime_problems(settings))


def test_literal_password_names_password_env_and_file(tmp_path) -> None:
    text = default_config_text().replace('password_env = "EB_SMPP_PASSWORD"',
                                         'password = "secret"')
    with pytest.raises(ConfigError) as exc:
        load_settings(_config(tmp_path, text))
    assert "password_env" in str(exc.value) and "password_file" in str(exc.value)


def _postgresql(text: str, storage: str) -> str:
    return text.replace('backend = "sqlite"', storage, 1)


def test_postgres_is_spelled_postgresql(tmp_path) -> None:
    text = _postgresql(default_config_text(), 'backend = "postgres"')
    assert 'backend = "postgres"' in text
    with pytest.raises(ConfigError) as exc:
        load_settings(_config(tmp_path, text))
    assert "storage.backend" in str(exc.value) and '"postgresql"' in str(exc.value)


@pytest.mark.parametrize(("storage", "words"), [
    ('backend = "postgresql"', "needs storage.url"),
    ('backend = "postgresql"\nurl = "mysql://db/x"', "is not a PostgreSQL URL"),
    ('backend = "postgresql"\nurl = "postgresql://eb:s3cret@db/x"', "carries a password"),
    ('backend = "postgresql"\nurl = "postgresql://eb@db/x"\ndsn = "postgresql://eb@db/x"',
     "keep one"),
    ('backend = "sqlite"\nurl = "postgresql://eb@db/x"', 'for backend = "postgresql"'),
])
def test_postgresql_settings_are_checked(tmp_path, storage, words) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(_config(tmp_path, _postgresql(default_config_text(), storage)))
    assert words in str(exc.value) and "s3cret" not in str(exc.value)


def test_postgresql_is_accepted_but_the_node_does_not_run_on_it_yet(tmp_path,
                                                                     monkeypatch) -> None:
    monkeypatch.setenv("EB_SMPP_PASSWORD", "pw123456")
    monkeypatch.setenv("EB_PG_PASSWORD", "pg-secret")
    text = _postgresql(default_config_text(), 'backend = "postgresql"\n'
                       'url = "postgresql://eb@127.0.0.1:5432/ledger"\n'
                       'password_env = "EB_PG_PASSWORD"')
    settings = load_settings(_config(tmp_path, text))
    assert settings.storage.postgresql_url() == "postgresql://eb@127.0.0.1:5432/ledger"
    assert "pg-secret" in settings.storage.postgresql_conninfo()
    problems = runtime_problems(settings)
    assert any("lending service does not yet run on PostgreSQL" in p for p in problems)
    monkeypatch.delenv("EB_PG_PASSWORD")
    with pytest.raises(ConfigError, match="EB_PG_PASSWORD"):
        settings.storage.postgresql_conninfo()


def test_shipped_secrets_example_fits_smpp() -> None:
    lines = (ROOT / "deploy" / "systemd" / "secrets.env.example").read_text().splitlines()
    value = next(line.split("=", 1)[1] for line in lines
                 if line.startswith("EB_SMPP_PASSWORD="))
    assert 1 <= len(value) <= 8
