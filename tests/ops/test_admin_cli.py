"""`extrabalance import-profiles`, `extrabalance subscriber ...`, `extrabalance
purge-idempotency` and the backup command, against a ledger file on disk."""

from __future__ import annotations

import io
import json
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from extrabalance import cli
from extrabalance.admin_cli import (
    backup_command,
    import_profiles_command,
    purge_idempotency_command,
    subscriber_command,
)
from extrabalance.ledger import store
from extrabalance.ledger.db import connect, migrate
from tests.ops.support import write_config

M = "201001234567"


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path)


def test_import_profiles_reports_good_and_bad_rows(config, tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("msisdn,tenure_days,arpu_minor,language\n"
                        f"{M},400,5000,en\n201001234568,x,1,en\n201001234569,10,1,ar\n{M},401,5000,en\n")
    out = io.StringIO()
    code = import_profiles_command(str(config), str(csv_path), progress=False, out=out)
    text = out.getvalue()
    assert code == 1
    assert "rows ok 3 (of which updated 1), bad rows 1" in text
    assert "line 3:" in text and "tenure_days" in text
    conn = sqlite3.connect(tmp_path / "ledger.db")
    assert conn.execute("SELECT tenure_days FROM subscribers WHERE msisdn = ?", (M,)).fetchone() == (401,)


def test_import_profiles_all_good_exits_0(config, tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text(f"msisdn,tenure_days,arpu_minor\n{M},400,5000\n")
    assert import_profiles_command(str(config), str(csv_path), progress=False,
                                   out=io.StringIO()) == 0


def test_import_profiles_bad_header_exits_2(config, tmp_path, capsys):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("phone,tenure\n1,2\n")
    out = io.StringIO()
    assert import_profiles_command(str(config), str(csv_path), progress=False, out=out) == 2
    assert "header" in capsys.readouterr().err


def _ledger_with_a_loan(tmp_path):
    conn = connect(tmp_path / "ledger.db")
    migrate(conn)
    now = datetime.now(UTC)
    conn.execute("BEGIN")
    store.insert_loan(conn, msisdn=M, tier_id=4, principal_minor=500, fee_minor=50,
                      state=store.ACTIVE, channel="ussd", idempotency_key="k1",
                      in_node="in-a.operator.example", session_id="s1", now=now)
    store.learn_route(conn, M, "in-b.operator.example", now)
    conn.execute("COMMIT")
    conn.close()


def test_subscriber_show_text_and_json(config, tmp_path):
    _ledger_with_a_loan(tmp_path)
    out = io.StringIO()
    assert subscriber_command(str(config), "show", M, out=out) == 0
    text = out.getvalue()
    assert "debt" in text and "5.50 EGP" in text and "ACTIVE" in text
    assert "in-b.operator.example (learned: in-b.operator.example, static: in-a.operator.example)" in text
    out = io.StringIO()
    assert subscriber_command(str(config), "show", M, json_output=True, out=out) == 0
    view = json.loads(out.getvalue())
    assert view["debt_minor"] == 550 and len(view["journal"]) == 4
    assert view["route"]["in_node"] == "in-b.operator.example"


def _shown(config):
    out = io.StringIO()
    subscriber_command(str(config), "show", M, json_output=True, out=out)
    return json.loads(out.getvalue())


def test_subscriber_bar_and_unbar_are_audited(config, tmp_path):
    _ledger_with_a_loan(tmp_path)
    assert subscriber_command(str(config), "bar", M, reason="fraud", who="dave",
                              out=io.StringIO()) == 0
    view = _shown(config)
    assert view["subscriber"]["barred_manual"] == 1 and view["subscriber"]["barred_reason"] == "fraud"
    assert subscriber_command(str(config), "unbar", M, reason="cleared", who="erin",
                              out=io.StringIO()) == 0
    view = _shown(config)
    assert view["subscriber"]["barred_manual"] == 0
    assert [(a["action"], a["who"]) for a in view["audit"]] == [("unbar", "erin"), ("bar", "dave")]


def test_a_bar_from_the_command_writes_its_edr_line_like_the_api(config, tmp_path):
    _ledger_with_a_loan(tmp_path)
    assert subscriber_command(str(config), "bar", M, reason="fraud", who="dave",
                              out=io.StringIO()) == 0
    assert subscriber_command(str(config), "unbar", M, reason="cleared", who="erin",
                              out=io.StringIO()) == 0
    edr = "".join(p.read_text() for p in sorted((tmp_path / "edr").glob("edr-*.csv")))
    kinds = [line.split(",")[2] for line in edr.splitlines()[1:]]
    assert kinds == ["bar", "unbar"]
    assert "fraud" in edr and "cleared" in edr


def test_subscriber_and_its_changes_on_postgresql(tmp_path):
    """The command runs on the configured ledger through the account service: on
    PostgreSQL too (no SQLite file is made)."""
    from tests.pg import admin_connection, fresh_schema_url

    admin_connection().close()  # skips, saying why, when no server answers
    with fresh_schema_url("eb_cli") as url:
        storage = f'backend = "postgresql"\nurl = "{url}"\nedr_dir = "{tmp_path / "edr"}"'
        config = write_config(tmp_path, replace={'backend = "sqlite"': storage})
        assert subscriber_command(str(config), "bar", M, reason="fraud", who="dave",
                                  out=io.StringIO()) == 0
        view = _shown(config)
        assert view["subscriber"]["barred_manual"] and view["audit"][0]["who"] == "dave"
        assert subscriber_command(str(config), "auto-advance-on", M, reason="shop", who="dave",
                                  out=io.StringIO()) == 0
        assert _shown(config)["subscriber"]["auto_advance_opt_in"]
    assert not (tmp_path / "ledger.db").exists()
    edr = "".join(p.read_text() for p in sorted((tmp_path / "edr").glob("edr-*.csv")))
    assert [line.split(",")[2] for line in edr.splitlines()[1:]] == ["bar"]


def test_subscriber_auto_advance_on_and_off_are_audited(config, tmp_path, capsys):
    _ledger_with_a_loan(tmp_path)
    assert cli.main(["subscriber", "auto-advance-on", M, "--reason", "asked at the shop",
                     "--who", "dave", "--config", str(config)]) == 0
    assert "automatic advances on, by dave" in capsys.readouterr().out
    out = io.StringIO()
    assert subscriber_command(str(config), "auto-advance-on", M, reason="again", who="dave",
                              out=out) == 0
    assert "already on (nothing written)" in out.getvalue()
    assert subscriber_command(str(config), "auto-advance-off", M, reason="hotline", who="erin",
                              out=io.StringIO()) == 0
    view = _shown(config)
    assert view["subscriber"]["auto_advance_opt_in"] == 0
    assert [(a["action"], a["who"], a["why"]) for a in view["audit"]] == [
        ("auto_advance_off", "erin", "hotline"), ("auto_advance_on", "dave", "asked at the shop")]


@pytest.mark.parametrize("action, msisdn, reason, code", [
    ("show", "12ab", "", 2),
    ("bar", M, "", 2),  # reason required
    ("auto-advance-on", M, "", 2),  # reason required
    ("show", "209999999999", "", 1),  # unknown subscriber
])
def test_subscriber_command_refusals(config, tmp_path, action, msisdn, reason, code):
    _ledger_with_a_loan(tmp_path)
    assert subscriber_command(str(config), action, msisdn, reason=reason, out=io.StringIO()) == code


def test_subscriber_without_a_ledger_file(config):
    assert subscriber_command(str(config), "show", M, out=io.StringIO()) == 1


def test_cli_wiring_reaches_admin_cli(config, tmp_path, capsys):
    _ledger_with_a_loan(tmp_path)
    assert cli.main(["subscriber", "show", M, "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["msisdn"] == M


def test_backup_is_a_consistent_checked_copy(config, tmp_path):
    _ledger_with_a_loan(tmp_path)
    dest = tmp_path / "backups"
    dest.mkdir()
    out = io.StringIO()
    assert backup_command(str(config), str(dest), out=out) == 0
    copies = list(dest.glob("extrabalance-*.db"))
    assert len(copies) == 1 and "integrity ok" in out.getvalue()
    copy = sqlite3.connect(copies[0])
    assert copy.execute("SELECT COUNT(*), SUM(amount_minor) FROM journal").fetchone() == (4, 0)
    assert backup_command(str(config), str(copies[0]), out=io.StringIO()) == 2  # no overwrite


def test_purge_idempotency_deletes_keys_past_the_configured_retention(config, tmp_path):
    _ledger_with_a_loan(tmp_path)
    conn = connect(tmp_path / "ledger.db")
    now = datetime.now(UTC)
    conn.execute("BEGIN")
    for i in range(1_200):  # more than one batch
        store.idempotent_put(conn, f"borrow:old{i}", {"i": i}, now - timedelta(days=11))
    store.idempotent_put(conn, "borrow:recent", {}, now - timedelta(days=9))
    store.idempotent_put(conn, "admin-adjust:T-1", {}, now - timedelta(days=400))
    conn.execute("COMMIT")
    out = io.StringIO()
    assert purge_idempotency_command(str(config), out=out) == 0  # default: 240 hours
    assert "1,200 idempotency keys older than 240 hours" in out.getvalue()
    left = {r[0] for r in conn.execute("SELECT key FROM idempotency")}
    conn.close()
    assert left == {"borrow:recent", "admin-adjust:T-1"}


def test_purge_idempotency_without_a_ledger_file(config, capsys):
    assert cli.main(["purge-idempotency", "--config", str(config)]) == 1
    assert "no ledger" in capsys.readouterr().err
