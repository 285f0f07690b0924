"""Import the operator's daily subscriber-profile CSV (30 million rows is normal).

Header: `msisdn,tenure_days,arpu_minor[,language][,extra attribute columns...]`.
The file is streamed (constant memory), upserted in large `executemany` batches, one
transaction per batch; re-importing updates rows in place and never touches what the
node owns (opt-ins, bars, learned routes, bad-debt counts). Every bad row is reported
with its line number and reason; none is skipped silently.

One optional named column, `auto_advance` (anywhere after `arpu_minor`), opts a
subscriber in to automatic advances (`1`, `yes`, `true`, `on`) or out (`0`, `no`,
`false`, `off`); an empty cell leaves his choice as it is. Every change it makes is
written to the audit trail (action `auto_advance_on` / `auto_advance_off`, by
`import-profiles`); a value equal to the present one writes nothing.

On PostgreSQL (`import_profiles_postgresql`, what `extrabalance import-profiles` runs
when `[storage] backend = "postgresql"`): the same parsing and validation, each batch
copied (COPY) into a temporary table and upserted from it in one transaction; in a
batch, the last row of an MSISDN wins (as the row-by-row SQLite upsert leaves it).

Run alone: `python -m extrabalance.ledger.profiles LEDGER.db|postgresql://... PROFILES.csv`.
"""

from __future__ import annotations

import csv
import io
import sqlite3
import sys
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import TYPE_CHECKING, Any

from extrabalance.clock import SYSTEM_CLOCK
from extrabalance.ledger.db import connect, migrate
from extrabalance.ledger.store import new_id

if TYPE_CHECKING:
    import psycopg

IMPORT_BATCH_ROWS = 50_000  # rows per transaction: big enough to amortise the fsync,
# small enough that the node's writer never waits long behind an import batch
# On PostgreSQL a batch holds its subscribers' row locks until it commits: a node unit
# for one of them waits that long (measured: a 20 000-row batch commits in about 0.3 s).
IMPORT_BATCH_ROWS_PG = 20_000
BAD_ROWS_KEPT_MAX = 10_000  # bad rows listed in the report; beyond that only counted
REQUIRED = ("msisdn", "tenure_days", "arpu_minor")
AUTO_ADVANCE_COLUMN = "auto_advance"
AUTO_ADVANCE_VALUES = {"1": 1, "yes": 1, "true": 1, "on": 1, "y": 1,
                       "0": 0, "no": 0, "false": 0, "off": 0, "n": 0}
AUDIT_WHO = "import-profiles"
READ_BUFFER_BYTES = 1 << 20

UPSERT = (
    "INSERT INTO subscribers (msisdn, tenure_days, arpu_minor, attributes, language,"
    " updated_at) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (msisdn) DO UPDATE SET tenure_days = excluded.tenure_days,"
    " arpu_minor = excluded.arpu_minor, attributes = excluded.attributes,"
    " language = COALESCE(excluded.language, subscribers.language),"
    " updated_at = excluded.updated_at"
)
# The opt-in column: the audit line first (only where the value changes), then the change.
AUDIT_OPT_IN = (
    "INSERT INTO audit (audit_id, msisdn, action, who, why, detail, created_at)"
    " SELECT ?, msisdn, ?, ?, ?, '{}', ? FROM subscribers"
    " WHERE msisdn = ? AND auto_advance_opt_in != ?"
)
SET_OPT_IN = (
    "UPDATE subscribers SET auto_advance_opt_in = ?, updated_at = ?"
    " WHERE msisdn = ? AND auto_advance_opt_in != ?"
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


INT_DIGITS_MAX = 18  # longest integer accepted: every 18-digit number fits SQLite's int64


def _is_digits(text: str) -> bool:
    """ASCII digits only (str.isdigit alone also accepts '²' and other scripts' digits)."""
    return text.isascii() and text.isdigit()


class _RowParser:
    """Turns a CSV row into an UPSERT tuple or the reason it is bad.

    Runs 30 million times per import, so it avoids regexes and builds the attributes
    JSON from pre-encoded keys; the text is exactly what `json.dumps(attributes,
    separators=(",", ":"))` gives (ASCII-escaped strings, integers as numbers).
    """

    def __init__(self, header: list[str], has_language: bool, extra_from: int, now: str,
                 languages: frozenset[str] | None = None, bulk_opt_in: bool = True):
        self.bulk_opt_in = bulk_opt_in
        self.fields = len(header)
        self.has_language = has_language
        self.languages = languages
        # The opt-in column is the node's, not an attribute; a row then carries a 7th
        # element (1, 0 or None for "leave as it is").
        self.auto_at = (header.index(AUTO_ADVANCE_COLUMN)
                        if AUTO_ADVANCE_COLUMN in header[extra_from:] else None)
        self.extras = [
            (i, encode_basestring_ascii(header[i]) + ":") for i in range(extra_from, len(header))
            if i != self.auto_at
        ]
        self.now = now

    def __call__(self, row: list[str]) -> tuple[object, ...] | str:
        if len(row) != self.fields:
            return f"expected {self.fields} fields, got {len(row)}"
        msisdn = row[0].strip()
        tenure = row[1].strip()
        arpu = row[2].strip()
        if not (6 <= len(msisdn) <= 15 and _is_digits(msisdn)):
            return f"msisdn {msisdn!r} is not 6-15 digits"
        if not (_is_digits(tenure) and len(tenure) <= INT_DIGITS_MAX):
            return f"tenure_days {tenure!r} is not a non-negative integer"
        if not (_is_digits(arpu) and len(arpu) <= INT_DIGITS_MAX):
            return f"arpu_minor {arpu!r} is not a non-negative integer (minor units)"
        language = None
        if self.has_language:
            language = row[3].strip().lower() or None
            if language is not None and not (
                2 <= len(language) <= 3 and language.isascii() and language.isalpha()
            ):
                return f"language {row[3]!r} is not a 2-3 letter code"
            if self.languages is not None and language not in self.languages:
                return (f"language {language!r} has no templates (configured: "
                        f"{', '.join(sorted(self.languages))})")
        auto: int | None = None
        if self.auto_at is not None:
            cell = row[self.auto_at].strip().lower()
            if cell:
                auto = AUTO_ADVANCE_VALUES.get(cell)
                if auto is None:
                    return (f"auto_advance {row[self.auto_at]!r} is not one of 1/0, "
                            "yes/no, true/false, on/off (or empty: unchanged)")
                if auto and not self.bulk_opt_in:
                    return ("auto_advance on: the consumer-protection preset allows the "
                            "opt-in only by the subscriber's own reply ([protection] "
                            "bulk_opt_in = false)")
        parts = []
        for i, key in self.extras:
            value = row[i].strip()
            if value == "":
                continue
            if _is_digits(value) or (value[0] == "-" and _is_digits(value[1:])):
                # Integers travel as JSON numbers (leading zeros dropped, as int() does).
                parts.append(key + str(int(value)))
            else:
                parts.append(key + encode_basestring_ascii(value))
        upsert = (
            msisdn,
            int(tenure),
            int(arpu),
            "{" + ",".join(parts) + "}",
            language,
            self.now,
        )
        return upsert if self.auto_at is None else (*upsert, auto)


def import_profiles(
    db_path: str | Path,
    csv_path: str | Path,
    *,
    progress: bool = False,
    batch_rows: int = IMPORT_BATCH_ROWS,
    languages: Collection[str] | None = None,
    bulk_opt_in: bool = True,
) -> ImportReport:
    """Upsert every good row of `csv_path` into the ledger's subscribers table.

    `languages`: the languages the node has templates for; a row with another one is
    refused (None: any 2-3 letter code). `bulk_opt_in` false ([protection]): a row that
    opts a subscriber in to automatic advances is refused (opting out stays possible)."""
    conn = connect(db_path)
    try:
        migrate(conn)
        # The import may run beside the node: more cache, same durability.
        conn.execute("PRAGMA cache_size=-262144")  # 256 MiB
        return _import_file(
            lambda batch: _flush(conn, batch),
            lambda: int(conn.execute("SELECT COUNT(*) FROM subscribers").fetchone()[0]),
            csv_path, progress=progress, batch_rows=batch_rows, languages=languages,
            bulk_opt_in=bulk_opt_in)
    finally:
        conn.close()


def import_profiles_postgresql(conninfo: str, csv_path: str | Path, *,
                               batch_rows: int = IMPORT_BATCH_ROWS_PG,
                               **options: Any) -> ImportReport:
    """`import_profiles` into the PostgreSQL ledger at `conninfo` (migrated first):
    the same options (`progress`, `languages`, `bulk_opt_in`), the same rows accepted
    and refused, the same report."""
    import psycopg

    from extrabalance.ledger.postgres import CONNECT_TIMEOUT_S, migrate_postgres

    with psycopg.connect(conninfo, autocommit=True,
                         connect_timeout=int(CONNECT_TIMEOUT_S)) as conn:
        migrate_postgres(conn)
        conn.execute(_PG_STAGE)
        return _import_file(
            lambda batch: _flush_postgresql(conn, batch), lambda: _count_pg(conn), csv_path,
            batch_rows=batch_rows, **{"progress": False, "languages": None,
                                      "bulk_opt_in": True, **options})


def _import_file(
    write: Callable[[list[tuple[object, ...]]], None],
    count: Callable[[], int],
    csv_path: str | Path,
    *,
    progress: bool,
    batch_rows: int,
    languages: Collection[str] | None,
    bulk_opt_in: bool,
) -> ImportReport:
    """Parse `csv_path`, handing good rows to `write` a batch at a time (one
    transaction each, on a thread of its own); `count` counts the subscribers."""
    report = ImportReport()
    count_before = count()
    now = SYSTEM_CLOCK.now().isoformat(timespec="microseconds")
    path = Path(csv_path)
    total_bytes = path.stat().st_size
    bar = None
    flusher: _Flusher | None = None
    try:
        with path.open("rb", buffering=READ_BUFFER_BYTES) as raw:
            # utf-8-sig drops a byte-order mark at the start; newline="" lets csv see
            # the line ends itself. Progress reads the byte offset of the binary file.
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            reader = csv.reader(text)
            try:
                header = [h.strip().lower() for h in next(reader)]
            except StopIteration:
                raise ProfileFileError(f"{path}: empty file, expected a header") from None
            except UnicodeDecodeError as exc:
                raise ProfileFileError(f"{path}: header is not UTF-8 ({exc})") from None
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
            parse = _RowParser(header, has_language, extra_from, now,
                               None if languages is None else frozenset(languages),
                               bulk_opt_in)
            flusher = _Flusher(write)
            batch: list[tuple[object, ...]] = []
            rows = iter(reader)
            while True:
                first_line = reader.line_num + 1  # where this row starts
                try:
                    row = next(rows)
                except StopIteration:
                    break
                except UnicodeDecodeError as exc:
                    # The decoder works ahead of the csv reader: the line is approximate.
                    raise ProfileFileError(
                        f"{path}: not UTF-8 after line {reader.line_num} ({exc.reason});"
                        f" {report.rows_ok:,} rows imported before it"
                    ) from None
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                parsed = parse(row)
                if isinstance(parsed, str):
                    if reader.line_num > first_line and any("\n" in f for f in row):
                        # A quote left open swallows the lines after it into one field:
                        # the row to fix is where it opened, not where the file ended.
                        parsed = (f"a quoted field opened on this line runs to line "
                                  f"{reader.line_num}: unterminated quote? ({parsed})")
                    report.bad(first_line, parsed)
                    continue
                batch.append(parsed)
                if len(batch) >= batch_rows:
                    report.rows_ok += flusher.submit(batch)
                    batch = []
                    if bar is not None:
                        bar.update(task, completed=raw.tell(), rows=f"{report.rows_ok:,} rows")
            if batch:
                report.rows_ok += flusher.submit(batch)
            report.rows_ok += flusher.finish()
            if bar is not None:
                bar.update(task, completed=total_bytes, rows=f"{report.rows_ok:,} rows")
        # Rows that did not add a subscriber replaced one (a duplicate in the file too).
        report.rows_updated = report.rows_ok - (count() - count_before)
        return report
    finally:
        if flusher is not None:
            flusher.close()
        if bar is not None:
            bar.stop()


class _Flusher:
    """Commits batches on a thread of its own while the caller parses the next one.

    SQLite lets go of the GIL while it inserts and while COMMIT waits for the fsync
    (psycopg while it waits for the server), so on two cores parsing and writing
    overlap. At most one batch is being written and one being filled, so memory stays
    at two batches.
    """

    def __init__(self, write: Callable[[list[tuple[object, ...]]], None]) -> None:
        self.write = write
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="profile-import")
        self._pending: Future[int] | None = None

    def submit(self, batch: list[tuple[object, ...]]) -> int:
        """Queue `batch` (the caller hands it over); returns rows committed meanwhile."""
        done = self.finish()
        self._pending = self._pool.submit(self._write, batch)
        return done

    def finish(self) -> int:
        """Wait for the batch in flight; its exception, if any, is raised here."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else 0

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _write(self, batch: list[tuple[object, ...]]) -> int:
        self.write(batch)
        return len(batch)


def _flush(conn: sqlite3.Connection, batch: list[tuple[object, ...]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        if batch and len(batch[0]) == 7:  # with the auto_advance column
            conn.executemany(UPSERT, [row[:6] for row in batch])
            opt = [(row[0], row[6], row[5]) for row in batch if row[6] is not None]
            conn.executemany(AUDIT_OPT_IN, [
                (new_id(), "auto_advance_on" if on else "auto_advance_off", AUDIT_WHO,
                 "profile file", now, msisdn, on) for msisdn, on, now in opt])
            conn.executemany(SET_OPT_IN, [(on, now, msisdn, on) for msisdn, on, now in opt])
        else:
            conn.executemany(UPSERT, batch)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# -- PostgreSQL ------------------------------------------------------------------------

# A batch is copied here, then upserted from it; emptied at every commit.
_PG_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS profile_stage (seq INTEGER NOT NULL,"
    " msisdn TEXT COLLATE \"C\" NOT NULL, tenure_days INTEGER NOT NULL,"
    " arpu_minor BIGINT NOT NULL, attributes TEXT NOT NULL, language TEXT,"
    " updated_at TEXT NOT NULL, auto INTEGER, audit_id TEXT) ON COMMIT DELETE ROWS"
)
_PG_COPY = ("COPY profile_stage (seq, msisdn, tenure_days, arpu_minor, attributes, language,"
            " updated_at, auto, audit_id) FROM STDIN")
# The last row of each MSISDN in the batch (ON CONFLICT may touch a row once only).
_PG_LAST = ("(SELECT DISTINCT ON (msisdn) * FROM profile_stage{where}"
            " ORDER BY msisdn, seq DESC) st")
# Its language: the last one given in the batch (an empty cell keeps the one before).
_PG_UPSERT = (
    "INSERT INTO subscribers (msisdn, tenure_days, arpu_minor, attributes, language,"
    " updated_at) SELECT DISTINCT ON (msisdn) msisdn, tenure_days, arpu_minor, attributes,"
    " first_value(language) OVER (PARTITION BY msisdn ORDER BY language IS NULL, seq DESC),"
    " updated_at FROM profile_stage ORDER BY msisdn, seq DESC"
    + UPSERT[UPSERT.index(" ON CONFLICT"):]
)
_PG_AUDIT_OPT_IN = (
    "INSERT INTO audit (audit_id, msisdn, action, who, why, detail, created_at)"
    " SELECT st.audit_id, st.msisdn, CASE WHEN st.auto = 1 THEN 'auto_advance_on'"
    " ELSE 'auto_advance_off' END, %s, 'profile file', '{}', st.updated_at"
    f" FROM {_PG_LAST.format(where=' WHERE auto IS NOT NULL')}"
    " JOIN subscribers s ON s.msisdn = st.msisdn WHERE s.auto_advance_opt_in != st.auto"
)
_PG_SET_OPT_IN = (
    "UPDATE subscribers s SET auto_advance_opt_in = st.auto, updated_at = st.updated_at"
    f" FROM {_PG_LAST.format(where=' WHERE auto IS NOT NULL')}"
    " WHERE s.msisdn = st.msisdn AND s.auto_advance_opt_in != st.auto"
)
PG_RETRIES_MAX = 5  # a batch rolled back by a deadlock with a node's unit runs again


def _count_pg(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT COUNT(*) FROM subscribers").fetchone()
    return int(row[0]) if row else 0


def _flush_postgresql(conn: psycopg.Connection[Any], batch: list[tuple[object, ...]]) -> None:
    """One batch in one transaction: COPY into the stage, upsert, then the opt-in
    column's audit lines and changes. A deadlock with a node's unit (the batch locks
    its subscribers' rows) rolls the batch back; it runs again, whole."""
    import psycopg.errors

    with_auto = bool(batch) and len(batch[0]) == 7
    for attempt in range(PG_RETRIES_MAX + 1):
        try:
            with conn.transaction():
                with conn.cursor().copy(_PG_COPY) as copy:
                    for seq, row in enumerate(batch):
                        auto = row[6] if with_auto else None
                        copy.write_row((seq, *row[:6], auto,
                                        None if auto is None else new_id()))
                conn.execute(_PG_UPSERT)
                if with_auto:
                    conn.execute(_PG_AUDIT_OPT_IN, (AUDIT_WHO,))
                    conn.execute(_PG_SET_OPT_IN)
            return
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
            if attempt == PG_RETRIES_MAX:
                raise


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(
            "usage: python -m extrabalance.ledger.profiles LEDGER.db|postgresql://... PROFILES.csv",
            file=sys.stderr)
        return 2
    into = (import_profiles_postgresql if args[0].startswith(("postgresql:", "postgres:"))
            else import_profiles)
    try:
        report = into(args[0], args[1], progress=sys.stderr.isatty())
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
