"""Money and personal data on disk belong to the node's user alone, whatever the umask
(issue 22, finding 6), and no EDR cell runs as a spreadsheet formula."""

from __future__ import annotations

import csv
import io
import os
import stat
from datetime import UTC, date, datetime

import pytest

from extrabalance.admin_cli import backup_command
from extrabalance.ledger import store
from extrabalance.ledger.db import connect, migrate
from extrabalance.observability import EdrWriter, csv_cell
from extrabalance.report import build_figures, write_report
from tests.ops.support import write_config


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(autouse=True)
def loose_umask():
    """The umask of a cron job or a container: new files 0644, directories 0755."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_ledger_wal_and_shm_are_0600(tmp_path):
    conn = connect(tmp_path / "ledger.db")
    migrate(conn)
    conn.execute("BEGIN")
    store.learn_route(conn, "201001234567", "in-a.operator.example", datetime.now(UTC))
    conn.execute("COMMIT")
    for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
        assert mode(tmp_path / name) == 0o600, name
    conn.close()


def test_a_ledger_left_world_readable_is_narrowed_on_open(tmp_path):
    path = tmp_path / "ledger.db"
    migrate(connect(path))
    os.chmod(path, 0o644)
    connect(path).close()
    assert mode(path) == 0o600


def test_edr_directory_0700_and_files_0600(tmp_path):
    edr = EdrWriter(tmp_path / "state" / "edr", "node-1", clock=lambda: 1_764_000_000.0)
    edr.write("loan", {"msisdn": "201001234567", "amount_minor": 500})
    edr.flush()
    assert mode(tmp_path / "state") == 0o700
    assert mode(tmp_path / "state" / "edr") == 0o700
    [path] = (tmp_path / "state" / "edr").glob("edr-*.csv")
    assert mode(path) == 0o600


def test_backup_copy_is_0600(tmp_path):
    config = write_config(tmp_path)
    conn = connect(tmp_path / "ledger.db")
    migrate(conn)
    conn.close()
    dest = tmp_path / "backups"
    dest.mkdir(mode=0o755)  # the operator's directory: backup never creates one
    assert backup_command(str(config), str(dest / "copy.db"), out=io.StringIO()) == 0
    assert mode(dest / "copy.db") == 0o600


def test_report_files_are_0600(tmp_path):
    edr = EdrWriter(tmp_path / "edr", "node-1", clock=lambda: 1_764_000_000.0)
    edr.write("loan", {"msisdn": "201001234567", "amount_minor": 500, "fee_minor": 50})
    edr.flush()
    day = datetime.fromtimestamp(1_764_000_000.0, UTC).date()
    out = tmp_path / "report"
    path = write_report(build_figures(day, tmp_path / "edr"), out, plots=False)
    assert mode(out) == 0o700 and mode(path) == 0o600
    assert mode(out / "figures.json") == 0o600


@pytest.mark.parametrize(
    "value, cell",
    [
        ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
        ("+1+1", "'+1+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("-500", "-500"),  # a number stays a number
        (-500, -500),
        ("who=ops; waived", "who=ops; waived"),
        (None, ""),
    ],
)
def test_csv_cell(value, cell):
    assert csv_cell(value) == cell


def test_admin_text_reaches_the_edr_as_text_not_formula(tmp_path):
    """`reason` and `who` of an adjustment came into the EDR verbatim: `=cmd|...` ran
    when an operator opened the file in a spreadsheet."""
    edr = EdrWriter(tmp_path, "node-1", clock=lambda: 1_764_000_000.0)
    edr.write(
        "adjustment",
        {
            "msisdn": "201001234567",
            "reason": '=HYPERLINK("x")',
            "detail": "who=@evil; -1+1",
            "debt_after_minor": -0,
        },
    )
    edr.flush()
    [path] = tmp_path.glob("edr-*.csv")
    [row] = list(csv.DictReader(path.open(encoding="utf-8")))
    assert row["reason"] == '\'=HYPERLINK("x")'
    assert row["detail"] == "who=@evil; -1+1"  # starts with a letter: harmless
    assert row["debt_after_minor"] == "0"
    assert date.fromisoformat(row["time"][:10])
