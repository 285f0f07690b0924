"""The do-not-disturb list: MSISDNs no advertisement or campaign SMS may reach (an
opt-in extension: the list is empty unless the operator fills it).

What this file owns: the list's use cases (add, remove, page through, import a file),
each one unit of work, and the import's file format. The rule that enforces it lives
where every ad is decided (`service.ads.decide_and_record`: a listed MSISDN is
suppressed with reason `do_not_disturb`), so triggered ads and campaigns alike obey it.

Import format: a CSV or plain text file with one MSISDN per line (the first column;
an optional header whose first cell is `msisdn`; blank lines and lines starting with
`#` skipped). A line that is not 1 to 15 digits is reported and skipped; the rest are
listed in batches of `IMPORT_BATCH_ROWS`, so a file of millions of numbers never holds
the ledger for long.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

from extrabalance.service.unit_of_work import LedgerTx, UnitOfWork

MSISDN_RE = re.compile(r"^[0-9]{1,15}$")
IMPORT_BATCH_ROWS = 5_000
BAD_LINES_SHOWN_MAX = 20  # bad lines named in the report; the rest only counted


@dataclass
class ImportReport:
    listed_new: int = 0
    already_listed: int = 0
    bad_lines: int = 0
    bad_examples: list[str] = field(default_factory=list)


def read_msisdns(path: Path, report: ImportReport) -> Iterator[str]:
    """The MSISDNs of an import file (module docstring), bad lines counted in `report`."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        for line_no, row in enumerate(csv.reader(fh), start=1):
            cell = row[0].strip() if row else ""
            if not cell or cell.startswith("#") or (line_no == 1 and cell.lower() == "msisdn"):
                continue
            if not MSISDN_RE.match(cell):
                report.bad_lines += 1
                if len(report.bad_examples) < BAD_LINES_SHOWN_MAX:
                    report.bad_examples.append(f"line {line_no}: {cell[:40]!r}")
                continue
            yield cell


def _add(tx: LedgerTx, *, msisdns: list[str], source: str, who: str, now: datetime) -> int:
    return tx.dnd_add(msisdns, source, who, now)


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class DoNotDisturb:
    """The list's use cases over the ledger's unit of work."""

    def __init__(self, ledger: UnitOfWork, clock: Callable[[], datetime]) -> None:
        self.ledger = ledger
        self.clock = clock

    async def add(self, msisdn: str, who: str, why: str) -> bool:
        """List one MSISDN (audited); False when it was listed already."""
        now = self.clock()

        def add(tx: LedgerTx) -> bool:
            added = tx.dnd_add([msisdn], "admin", who, now) == 1
            if added:
                tx.audit(msisdn, "dnd_add", who, why, now)
            return added

        return await self.ledger.write(add)

    async def remove(self, msisdn: str, who: str, why: str) -> bool:
        """Take one MSISDN off the list (audited); False when it was not listed."""
        now = self.clock()

        def remove(tx: LedgerTx) -> bool:
            removed = tx.dnd_remove(msisdn)
            if removed:
                tx.audit(msisdn, "dnd_remove", who, why, now)
            return removed

        return await self.ledger.write(remove)

    async def listed(self, msisdn: str) -> bool:
        return await self.ledger.read_point(lambda tx: tx.dnd_listed(msisdn))

    async def page(self, after_msisdn: str, limit: int) -> list[tuple[str, str, str, str]]:
        return await self.ledger.read(lambda tx: tx.dnd_page(after_msisdn, limit))

    async def import_file(self, path: Path, source: str, who: str) -> ImportReport:
        """List every MSISDN of an import file (module docstring)."""
        report = ImportReport()
        for batch in _batches(read_msisdns(path, report), IMPORT_BATCH_ROWS):
            now = self.clock()
            new = await self.ledger.write(partial(_add, msisdns=batch, source=source, who=who,
                                                  now=now))
            report.listed_new += new
            report.already_listed += len(batch) - new
        return report
