"""Profile import refuses what the node cannot use and says where: a language without
templates, and an unterminated quote reported on the line where it opened."""

from __future__ import annotations

import io
import json
import sqlite3

from extrabalance.admin_cli import import_profiles_command
from extrabalance.config import default_config_text
from extrabalance.ledger.profiles import import_profiles

HEADER = "msisdn,tenure_days,arpu_minor,language\n"


def test_unknown_language_is_refused_when_the_languages_are_given(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text(HEADER + "201000000001,400,5000,en\n201000000002,400,5000,fr\n")
    report = import_profiles(tmp_path / "l.db", csv_path, languages={"en", "ar"})
    assert report.rows_ok == 1
    assert report.bad_rows == [(3, "language 'fr' has no templates (configured: ar, en)")]


def test_import_profiles_command_checks_the_config_languages(tmp_path):
    config = tmp_path / "eb.toml"
    config.write_text(default_config_text().replace(
        'path = "var/extrabalance.db"', f'path = "{tmp_path / "l.db"}"'))
    csv_path = tmp_path / "p.csv"
    csv_path.write_text(HEADER + "201000000002,400,5000,fr\n")
    out = io.StringIO()
    assert import_profiles_command(str(config), str(csv_path), progress=False, out=out) == 1
    assert "line 2: language 'fr' has no templates" in out.getvalue()


def test_unterminated_quote_is_reported_where_it_opened(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text(HEADER + "201000000001,400,5000,en\n"
                        '201000000002,"400,5000,en\n'
                        "201000000003,400,5000,en\n"
                        "201000000004,400,5000,en\n")
    report = import_profiles(tmp_path / "l.db", csv_path)
    assert report.rows_ok == 1
    [(line, reason)] = report.bad_rows
    assert line == 3 and "unterminated quote" in reason and "line 5" in reason


def test_auto_advance_column_opts_in_and_out_with_an_audit_line_per_change(tmp_path):
    db = tmp_path / "l.db"
    first = tmp_path / "a.csv"
    first.write_text("msisdn,tenure_days,arpu_minor,language,auto_advance,region\n"
                     "201000000001,1,2,ar,yes,cairo\n"
                     "201000000002,1,2,,,giza\n"
                     "201000000003,1,2,,0,\n"
                     "201000000004,1,2,,maybe,\n")
    report = import_profiles(db, first, batch_rows=2)
    assert report.rows_ok == 3
    assert [(line, "auto_advance" in why) for line, why in report.bad_rows] == [(5, True)]
    conn = sqlite3.connect(db)
    attributes = dict(conn.execute("SELECT msisdn, attributes FROM subscribers"))
    conn.close()
    assert json.loads(attributes["201000000001"]) == {"region": "cairo"}  # not an attribute
    second = tmp_path / "b.csv"  # opt 1 out, 2 in, leave 3 as it is; 1's repeat is no change
    second.write_text("msisdn,tenure_days,arpu_minor,auto_advance\n"
                      "201000000001,1,2,off\n201000000002,1,2,1\n201000000003,1,2,\n")
    import_profiles(db, second)
    import_profiles(db, second)  # the same file again changes nothing and audits nothing
    conn = sqlite3.connect(db)
    opted = dict(conn.execute("SELECT msisdn, auto_advance_opt_in FROM subscribers"))
    audit = conn.execute("SELECT msisdn, action, who FROM audit ORDER BY created_at, msisdn"
                         ).fetchall()
    conn.close()
    assert opted == {"201000000001": 0, "201000000002": 1, "201000000003": 0}
    assert audit == [("201000000001", "auto_advance_on", "import-profiles"),
                     ("201000000001", "auto_advance_off", "import-profiles"),
                     ("201000000002", "auto_advance_on", "import-profiles")]


def test_opt_in_by_file_is_refused_where_the_protection_preset_forbids_it(tmp_path):
    """[protection] bulk_opt_in = false (the eg-ntra and ng-fccpc presets): a row that
    opts in is refused and says why; opting out still works."""
    db = tmp_path / "l.db"
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("msisdn,tenure_days,arpu_minor,auto_advance\n"
                        "201000000001,1,2,yes\n201000000002,1,2,no\n")
    report = import_profiles(db, csv_path, bulk_opt_in=False)
    assert report.rows_ok == 1
    assert [(line, "reply" in why) for line, why in report.bad_rows] == [(2, True)]
    conn = sqlite3.connect(db)
    assert dict(conn.execute("SELECT msisdn, auto_advance_opt_in FROM subscribers")) == {
        "201000000002": 0}
    conn.close()
