"""Import the operator's daily subscriber-profile CSV (30 million rows is normal).

Header: `msisdn,tenure_days,arpu_minor[,language][,extra attribute columns...]`.
The file is streamed (constant memory), upserted in large `executemany` batches, one
transaction per batch; re-importing updates rows in place and never touches what the
node owns (opt-ins, bars, learned routes, bad-debt counts). Every bad row is reported
with its line number and reason; none is skipped silently.

Run alone: `python -m extrabalance.ledger.profiles LEDGER.db PROFILES.csv`.
"""

from __future__ import annotations

import csv
import json
import re
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from extrabalance.ledger.db import connect, migrate

IMPORT_BATCH_ROWS = 50_000  # rows per transaction: big enough to amortise the fsync,
# small enough that the node's writer never waits long behind an import batch
BAD_ROWS_KEPT_MAX = 10_000  # bad rows listed in the report; beyond that only counted
REQUIRED = ("msisdn", "tenure_days", "arpu_minor")
_MSISDN = re.compile(r"^[0-9]{6,15}$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}$")
_INT = re.compile(r"^-?[0-9]+$")

UPSERT = (
    "INSERT INTO subscribers (msisdn, tenure_days, arpu_minor, attributes, language,"
    " updated_at) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (msisdn) DO UPDATE SET tenure_days = excluded.tenure_days,"
    " arpu_minor = excluded.arpu_minor, attributes = excluded.attributes,"
    " language = COALESCE(excluded.language, subscribers.language),"
    " updated_at = excluded.updated_at"
)


class ProfileFileError(ValueError):
    """The file cannot be imported at all (bad header)."""


@dataclass
class ImportReport:
    rows_ok: int = 0
    rows_updated: int = 0  # rows that replaced an existing subscriber's profile
    bad_rows: list[tuple[int, str]] = field(default_factory=list)
    bad_rows_total: int = 0

    def bad(self, line_no: int, reason: str) -> None:
        self.bad_rows_total += 1
        if len(self.bad_rows) < BAD_ROWS_KEPT_MAX:
            self.bad_rows.append((line_no, reason))


class _CountingLines:
    """Decoded lines of a binary file, counting bytes read for the progress bar."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.bytes_read = 0

    def __iter__(self) -> Iterator[str]:
        for line in self.raw:
            self.bytes_read += len(line)
            yield line.decode("utf-8-sig" if self.bytes_read == len(line) else "utf-8")


def _attribute(value: str) -> str | int:
    return int(value) if _INT.match(value) else value


def _parse_row(
    row: list[str], header: list[str], has_language: bool, extra_from: int, now: str
) -> tuple[object, ...] | str:
    """A row ready for UPSERT, or the reason it is bad."""
    if len(row) != len(header):
        return f"expected {len(header)} fields, got {len(row)}"
    msisdn, tenure, arpu = (v.strip() for v in row[:3])
    if not _MSISDN.match(msisdn):
        return f"msisdn {msisdn!r} is not 6-15 digits"
    if not tenure.isdigit():
        return f"tenure_days {tenure!r} is not a non-negative integer"
    if not arpu.isdigit():
        return f"arpu_minor {arpu!r} is not a non-negative integer (minor units)"
    language = None
    if has_language:
        language = row[3].strip().lower() or None
        if language is not None and not _LANGUAGE.match(language):
            return f"language {row[3]!r} is not a 2-3 letter code"
    attributes = {
        header[i]: _attribute(row[i].strip())
        for i in range(extra_from, len(row))
        if row[i].strip() != ""
    }
    return (
        msisdn,
        int(tenure),
        int(arpu),
        json.dumps(attributes, separators=(",", ":")),
        language,
        now,
    )


def import_profiles(
    db_path: str | Path,
    csv_path: str | Path,
    *,
    progress: bool = False,
    batch_rows: int = IMPORT_BATCH_ROWS,
) -> ImportReport:
    """Upsert every good row of `csv_path` into the ledger's subscribers table."""
    report = ImportReport()
    conn = connect(db_path)
    migrate(conn)
    # The import may run beside the node: more cache, same durability.
    conn.execute("PRAGMA cache_size=-262144")  # 256 MiB
    count_before = conn.execute("SELECT COUNT(*) FROM subscribers").fetchone()[0]
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    path = Path(csv_path)
    total_bytes = path.stat().st_size
    bar = None
    try:
        with path.open("rb") as raw:
            lines = _CountingLines(raw)
            reader = csv.reader(iter(lines))
            try:
                header = [h.strip().lower() for h in next(reader)]
            except StopIteration:
                raise ProfileFileError(f"{path}: empty file, expected a header") from None
            if tuple(header[:3]) != REQUIRED:
                raise ProfileFileError(
                    f"{path}: header must start with {','.join(REQUIRED)}, got {header[:3]}"
                )
            if len(set(header)) != len(header):
                raise ProfileFileError(f"{path}: duplicate column names in header")
            has_language = len(header) > 3 and header[3] == "language"
            extra_from = 4 if has_language else 3
            if progress:
                from rich.progress import (
                    BarColumn,
                    DownloadColumn,
                    Progress,
                    TimeRemainingColumn,
                    TransferSpeedColumn,
                )

                bar = Progress(
                    "[bold]profiles",
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    TimeRemainingColumn(),
                    "{task.fields[rows]}",
                )
                bar.start()
                task = bar.add_task("import", total=total_bytes, rows="0 rows")
            batch: list[tuple[object, ...]] = []
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                parsed = _parse_row(row, header, has_language, extra_from, now)
                if isinstance(parsed, str):
                    report.bad(reader.line_num, parsed)
                    continue
                batch.append(parsed)
                if len(batch) >= batch_rows:
                    _flush(conn, batch)
                    report.rows_ok += len(batch)
                    batch.clear()
                    if bar is not None:
                        bar.update(
                            task, completed=lines.bytes_read, rows=f"{report.rows_ok:,} rows"
                        )
            if batch:
                _flush(conn, batch)
                report.rows_ok += len(batch)
            if bar is not None:
                bar.update(task, completed=total_bytes, rows=f"{report.rows_ok:,} rows")
        count_after = conn.execute("SELECT COUNT(*) FROM subscribers").fetchone()[0]
        # Rows that did not add a subscriber replaced one (a duplicate in the file too).
        report.rows_updated = report.rows_ok - (count_after - count_before)
        return report
    finally:
        if bar is not None:
            bar.stop()
        conn.close()


def _flush(conn: sqlite3.Connection, batch: list[tuple[object, ...]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(UPSERT, batch)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(
            "usage: python -m extrabalance.ledger.profiles LEDGER.db PROFILES.csv", file=sys.stderr
        )
        return 2
    try:
        report = import_profiles(args[0], args[1], progress=sys.stderr.isatty())
    except (ProfileFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"rows ok {report.rows_ok:,}, updated {report.rows_updated:,}, "
        f"bad {report.bad_rows_total:,}"
    )
    for line_no, reason in report.bad_rows[:50]:
        print(f"  line {line_no}: {reason}")
    return 0 if report.bad_rows_total == 0 else 3


if __name__ == "__main__":
    raise SystemExit(main())
