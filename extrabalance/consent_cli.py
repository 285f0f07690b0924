"""`extrabalance consent export MSISDN [--json]`: a subscriber's consent trail from the
node's ledger (service/protection.py; the admin API serves the same lines under
/api/v1/subscribers/{msisdn}/consents). CSV by default: at, msisdn, action, channel,
who, why, detail (JSON). Exit codes: 0 done (an empty trail too), 2 a bad MSISDN."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from typing import Any, TextIO

from extrabalance.core.msisdn import is_msisdn
from extrabalance.ledger.factory import open_ledger
from extrabalance.service.protection import consent_rows

COLUMNS = ("at", "msisdn", "action", "channel", "who", "why", "detail")


def consent_export_command(settings: Any, msisdn: str, *, as_json: bool = False,
                           out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if not is_msisdn(msisdn):
        print(f"consent export: {msisdn!r} is not an MSISDN (1 to 15 digits)", file=sys.stderr)
        return 2

    async def read() -> list[dict[str, Any]]:
        ledger = open_ledger(settings.storage)  # SQLite or PostgreSQL, as the node
        try:
            return await ledger.read(lambda tx: consent_rows(tx, msisdn))
        finally:
            await ledger.close()

    rows = asyncio.run(read())
    if as_json:
        print(json.dumps({"msisdn": msisdn, "consents": rows}, indent=2, ensure_ascii=False),
              file=out)
        return 0
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([*(row[c] for c in COLUMNS[:-1]),
                         json.dumps(row["detail"], ensure_ascii=False, sort_keys=True)])
    return 0
