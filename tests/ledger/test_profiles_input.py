"""Profile import refuses what the node cannot use and says where: a language without
templates, and an unterminated quote reported on the line where it opened."""

from __future__ import annotations

import io

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
