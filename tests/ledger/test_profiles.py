import json
import sqlite3

import pytest

from extrabalance.ledger.profiles import ProfileFileError, import_profiles, main


def rows(db):
    conn = sqlite3.connect(db)
    try:
        return {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT msisdn, tenure_days, arpu_minor, attributes, language FROM subscribers"
            )
        }
    finally:
        conn.close()


def test_import_good_and_bad_rows(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text(
        "msisdn,tenure_days,arpu_minor,language,region,level\n"
        "201001234567,400,6000,ar,cairo,3\n"
        "20100123456x,400,6000,en,cairo,3\n"
        "201001234568,-1,6000,en,giza,1\n"
        "201001234569,10,6.5,en,giza,1\n"
        "201001234570,10,0,english,giza,1\n"
        "201001234571,10,0\n"
        "\n"
        "201001234572,10,0,,,\n"
    )
    report = import_profiles(tmp_path / "l.db", csv_path, progress=False)
    assert report.rows_ok == 2 and report.rows_updated == 0
    assert [line for line, _ in report.bad_rows] == [3, 4, 5, 6, 7]
    assert "msisdn" in report.bad_rows[0][1] and "fields" in report.bad_rows[4][1]
    got = rows(tmp_path / "l.db")
    assert got["201001234567"][:2] == (400, 6000)
    assert json.loads(got["201001234567"][2]) == {"region": "cairo", "level": 3}
    assert got["201001234567"][3] == "ar"
    assert got["201001234572"][3] is None and json.loads(got["201001234572"][2]) == {}


def test_reimport_updates_in_place_and_keeps_node_state(tmp_path):
    db = tmp_path / "l.db"
    first = tmp_path / "a.csv"
    first.write_text("msisdn,tenure_days,arpu_minor,language\n201000000001,1,2,ar\n")
    import_profiles(db, first)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE subscribers SET auto_advance_opt_in = 1, barred_manual = 1")
    conn.commit()
    conn.close()
    second = tmp_path / "b.csv"
    second.write_text("msisdn,tenure_days,arpu_minor\n201000000001,30,40\n201000000002,5,6\n")
    report = import_profiles(db, second, batch_rows=1)
    assert (report.rows_ok, report.rows_updated) == (2, 1)
    got = rows(db)
    assert got["201000000001"][:2] == (30, 40) and got["201000000001"][3] == "ar"
    conn = sqlite3.connect(db)
    assert conn.execute(
        "SELECT auto_advance_opt_in, barred_manual FROM subscribers WHERE msisdn = '201000000001'"
    ).fetchone() == (1, 1)
    conn.close()


@pytest.mark.parametrize(
    "text", ["", "phone,tenure_days,arpu_minor\n", "msisdn,tenure_days,arpu_minor,x,x\n"]
)
def test_bad_header(tmp_path, text):
    p = tmp_path / "p.csv"
    p.write_text(text)
    with pytest.raises(ProfileFileError):
        import_profiles(tmp_path / "l.db", p)


def test_cli_exit_codes(tmp_path, capsys):
    p = tmp_path / "p.csv"
    p.write_text("msisdn,tenure_days,arpu_minor\n201000000001,1,2\nbad,1,2\n")
    assert main([str(tmp_path / "l.db"), str(p)]) == 3
    assert "line 3" in capsys.readouterr().out
    assert main([str(tmp_path / "l.db"), str(tmp_path / "missing.csv")]) == 1


def test_bom_and_progress(tmp_path):
    p = tmp_path / "p.csv"
    p.write_bytes("\ufeffmsisdn,tenure_days,arpu_minor\n201000000001,1,2\n".encode())
    assert import_profiles(tmp_path / "l.db", p, progress=True).rows_ok == 1


def test_non_ascii_digits_and_oversized_integers_are_bad_rows(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text(
        "msisdn,tenure_days,arpu_minor,level\n"
        "201000000001,\u00b2,5,1\n"  # superscript two: isdigit() but not a number here
        "201000000002,5,\u0663,1\n"  # Arabic-Indic three
        "\u0662\u0660\u0661000000003,5,5,1\n"
        "201000000004,1234567890123456789,5,1\n"  # does not fit SQLite's int64
        "201000000005,7,0008,-12\n",
        encoding="utf-8",
    )
    report = import_profiles(tmp_path / "l.db", p)
    assert report.rows_ok == 1
    assert [line for line, _ in report.bad_rows] == [2, 3, 4, 5]
    got = rows(tmp_path / "l.db")
    assert got["201000000005"][:2] == (7, 8)
    assert json.loads(got["201000000005"][2]) == {"level": -12}


def test_attributes_json_matches_json_dumps(tmp_path):
    p = tmp_path / "p.csv"
    values = ["caf\u00e9", 'quote"d', "back\\slash", "007", "-0", "-", "x-1", "\u0661"]
    header = ",".join(f"a{i}" for i in range(len(values)))
    cells = ",".join('"' + v.replace('"', '""') + '"' for v in values)
    p.write_text(f"msisdn,tenure_days,arpu_minor,{header}\n201000000001,1,2,{cells}\n")
    import_profiles(tmp_path / "l.db", p)
    stored = rows(tmp_path / "l.db")["201000000001"][2]
    expected = {
        f"a{i}": int(v) if v.lstrip("-").isdigit() and v.isascii() and v != "-" else v
        for i, v in enumerate(values)
    }
    assert stored == json.dumps(expected, separators=(",", ":"))


def test_not_utf8_is_a_clear_error(tmp_path):
    p = tmp_path / "p.csv"
    p.write_bytes(b"msisdn,tenure_days,arpu_minor\n201000000001,1,2\n20100000\xff0002,1,2\n")
    with pytest.raises(ProfileFileError, match="not UTF-8"):
        import_profiles(tmp_path / "l.db", p, batch_rows=1)
