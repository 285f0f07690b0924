"""`extrabalance dnd import FILE` and `extrabalance dnd list`: the do-not-disturb list
of the node's ledger from the command line (service/dnd.py; the admin API has the same
list under /api/v1/dnd). Exit codes: 0 done, 1 some lines refused, 2 bad arguments or
an unreadable file."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, TextIO

from extrabalance.clock import SYSTEM_CLOCK
from extrabalance.ledger.factory import open_ledger
from extrabalance.service.dnd import DoNotDisturb, ImportReport

LIST_PAGE_ROWS = 1_000


def dnd_command(settings: Any, action: str, path: str | None, source: str, who: str,
                *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if action == "import" and (path is None or not Path(path).is_file()):
        print(f"dnd import: {path}: no such file", file=sys.stderr)
        return 2

    async def main() -> int:
        ledger = open_ledger(settings.storage)
        try:
            dnd = DoNotDisturb(ledger, SYSTEM_CLOCK.now)
            if action == "list":
                after = ""
                while page := await dnd.page(after, LIST_PAGE_ROWS):
                    for msisdn, src, by, at in page:
                        print(f"{msisdn},{src},{by},{at}", file=out)
                    after = page[-1][0]
                return 0
            assert path is not None
            report = await dnd.import_file(Path(path), source, who)
            _print(path, report, out)
            return 1 if report.bad_lines else 0
        finally:
            await ledger.close()

    try:
        return asyncio.run(main())
    except (OSError, UnicodeDecodeError) as exc:
        print(f"dnd {action}: {path}: {exc}", file=sys.stderr)
        return 2


def _print(path: str, report: ImportReport, out: TextIO) -> None:
    print(f"{path}: listed {report.listed_new:,} new, {report.already_listed:,} already "
          f"listed, bad lines {report.bad_lines:,}", file=out)
    for example in report.bad_examples:
        print(f"  {example}", file=sys.stderr)
