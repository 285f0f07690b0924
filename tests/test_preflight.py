"""check-config asks what `run` needs: secrets present and within SMPP's limits, a
ledger path that can be created; a literal password is refused naming the keys to use;
a backend the node does not have is refused."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from extrabalance import cli
from extrabalance.config import ConfigError, default_config_text, load_settings
from extrabalance.preflight import runtime_problems

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


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


def test_postgresql_that_does_not_answer_is_a_clear_problem(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EB_SMPP_PASSWORD", "pw123456")
    monkeypatch.setenv("EB_PG_PASSWORD", "pg-secret")
    with socket.socket() as closed:  # a loopback port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    text = _postgresql(default_config_text(), 'backend = "postgresql"\n'
                       f'url = "postgresql://eb@127.0.0.1:{port}/ledger"\n'
                       'password_env = "EB_PG_PASSWORD"')
    settings = load_settings(_config(tmp_path, text))
    assert settings.storage.postgresql_url() == f"postgresql://eb@127.0.0.1:{port}/ledger"
    assert "pg-secret" in settings.storage.postgresql_conninfo()
    problems = runtime_problems(settings)
    unreachable = [p for p in problems if "cannot connect to PostgreSQL" in p]
    assert len(unreachable) == 1, problems
    assert f"127.0.0.1:{port}" in unreachable[0] and "pg-secret" not in unreachable[0]
    monkeypatch.delenv("EB_PG_PASSWORD")
    with pytest.raises(ConfigError, match="EB_PG_PASSWORD"):
        settings.storage.postgresql_conninfo()
    assert any("EB_PG_PASSWORD" in p for p in runtime_problems(settings))


def test_postgresql_that_answers_passes_and_edrs_go_to_their_own_directory(
        tmp_path, monkeypatch) -> None:
    from tests.pg import PG_DSN, admin_connection

    admin_connection().close()  # skips, saying why, when no server answers
    monkeypatch.setenv("EB_SMPP_PASSWORD", "pw123456")
    edrs = tmp_path / "node-a-edr"
    text = _postgresql(default_config_text(), 'backend = "postgresql"\n'
                       f'url = "{PG_DSN}"\nedr_dir = "{edrs}"')
    settings = load_settings(_config(tmp_path, text))
    assert runtime_problems(settings) == []
    assert settings.storage.edr_directory() == edrs
    (tmp_path / "a-file").write_text("")
    blocked = settings.model_copy(update={"storage": settings.storage.model_copy(
        update={"edr_dir": str(tmp_path / "a-file")})})
    assert any("storage.edr_dir" in p and "is a file" in p for p in runtime_problems(blocked))


def test_shipped_secrets_example_fits_smpp() -> None:
    lines = (ROOT / "deploy" / "systemd" / "secrets.env.example").read_text().splitlines()
    value = next(line.split("=", 1)[1] for line in lines
                 if line.startswith("EB_SMPP_PASSWORD="))
    assert 1 <= len(value) <= 8


@contextlib.contextmanager
def _logging_kept() -> Iterator[None]:
    """Put the logging configuration back as it was (for the tests that run after)."""
    import logging

    import structlog

    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.handlers = handlers
        root.setLevel(level)


def test_commands_on_the_sqlite_file_say_so_on_postgresql_and_the_port_ones_run(
        tmp_path, monkeypatch, capsys) -> None:
    """backup and report's ledger figures read the SQLite file: on PostgreSQL they
    refuse, naming what to use; subscriber and purge-idempotency are on the port and
    run there."""
    from tests.pg import admin_connection, fresh_schema_url

    admin_connection().close()  # skips, saying why, when no server answers
    with fresh_schema_url("eb_cli") as url:
        config = _config(tmp_path, _postgresql(default_config_text(),
                                               f'backend = "postgresql"\nurl = "{url}"'))
        code = cli.main(["backup", str(tmp_path / "copy.db"), "--config", str(config)])
        err = capsys.readouterr().err
        assert code == 2 and "pg_dump" in err and 'backend = "postgresql"' in err
        assert not (tmp_path / "copy.db").exists()
        code = cli.main(["subscriber", "show", "201001234567", "--config", str(config)])
        assert code == 1 and "not in the ledger" in capsys.readouterr().out  # on the port
        code = cli.main(["report", "--date", "2026-12-01", "--config", str(config)])
        assert code == 2 and "--no-ledger" in capsys.readouterr().err
        with _logging_kept():  # the command configures the process's logging
            code = cli.main(["purge-idempotency", "--config", str(config)])
        out = capsys.readouterr().out
        assert code == 0 and "0 idempotency keys" in out and "127.0.0.1" in out


async def test_an_empty_postgresql_beside_an_sqlite_ledger_with_loans_is_refused(
        tmp_path) -> None:
    """Switching storage.backend without copying the ledger would lend from an empty
    one: the node refuses, saying how to copy; after the copy it opens."""
    from extrabalance.config import StorageSection
    from extrabalance.core import sagas
    from extrabalance.ledger import Ledger
    from extrabalance.ledger.factory import open_ledger
    from extrabalance.ledger.pg_copy import copy_ledger
    from tests.pg import admin_connection, fresh_schema_url

    admin_connection().close()  # skips, saying why, when no server answers
    db = tmp_path / "ledger.db"
    sqlite_ledger = Ledger(db)
    await sqlite_ledger.write(lambda tx: tx.insert_loan(
        msisdn="201001234567", tier_id=1, principal_minor=100, fee_minor=10,
        state=sagas.ACTIVE, channel="ussd", idempotency_key="k", in_node="in-a",
        session_id="s", now=SAMPLE_NOW))
    await sqlite_ledger.close()
    with fresh_schema_url("eb_switch") as url:
        storage = StorageSection(backend="postgresql", url=url, path=str(db))
        with pytest.raises(ConfigError, match="ledger migrate") as refused:
            open_ledger(storage)
        assert "1 loans" in str(refused.value)
        assert copy_ledger(db, storage.postgresql_conninfo()).verified
        ledger = open_ledger(storage)
        try:
            assert await ledger.read(lambda tx: tx.debt_owed("201001234567")) == 110
        finally:
            await ledger.close()
