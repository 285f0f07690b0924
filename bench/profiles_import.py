"""The profile import on both ledgers, the same file, alternating runs in one session.

What this file owns: a profile CSV (bench/ledger.py's generator), imported into a new
SQLite ledger and into a new schema on the PostgreSQL server at $EB_BENCH_PG_DSN
(default the machine's), first import (inserts) and re-import (every row an update),
`--rounds` times each, alternating SQLite / PostgreSQL; profiles/s printed per run and
the medians.

    python -m bench.profiles_import [--subscribers 1000000] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cluster import pg_run
from bench.ledger import generate_csv
from extrabalance.ledger.profiles import import_profiles, import_profiles_postgresql


def one_round(csv_path: Path, work: Path, backend: str) -> dict[str, float]:
    """(first import, re-import) rows/s on a fresh ledger of `backend`."""
    out: dict[str, float] = {}
    if backend == "sqlite":
        db = work / f"ledger-{time.monotonic_ns()}.db"
        for phase in ("import", "reimport"):
            started = time.perf_counter()
            report = import_profiles(db, csv_path)
            out[phase] = report.rows_ok / (time.perf_counter() - started)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        return out
    with pg_run() as run:
        for phase in ("import", "reimport"):
            started = time.perf_counter()
            report = import_profiles_postgresql(run.url("import"), csv_path)
            out[phase] = report.rows_ok / (time.perf_counter() - started)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profiles_import")
    p.add_argument("--subscribers", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="eb-import-") as tmp:
        work = Path(tmp)
        csv_path = work / "profiles.csv"
        generate_csv(csv_path, args.subscribers)
        runs: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgresql": []}
        for n in range(args.rounds):
            for backend in ("sqlite", "postgresql"):
                got = one_round(csv_path, work, backend)
                runs[backend].append(got)
                if not args.json:
                    print(f"round {n + 1} {backend:<10} import {got['import']:>9,.0f} rows/s"
                          f"  re-import {got['reimport']:>9,.0f} rows/s", flush=True)
    result: dict[str, Any] = {"subscribers": args.subscribers, "rounds": args.rounds}
    for backend, results in runs.items():
        result[backend] = {phase: round(statistics.median(r[phase] for r in results))
                           for phase in ("import", "reimport")}
    print(json.dumps(result, sort_keys=True) if args.json else
          "medians (rows/s): " + json.dumps({k: result[k] for k in ("sqlite", "postgresql")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
