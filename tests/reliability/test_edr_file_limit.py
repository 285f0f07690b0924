"""Issue 22, finding 3: at the process's file limit the EDR flusher failed silently and
the refusal lines written meanwhile were lost for good. Now every line reaches the disk
once a descriptor is free again, and the failure was logged, counted and shown."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

CHILD = Path(__file__).with_name("edr_fd_child.py")
REPO = Path(__file__).resolve().parents[2]


def test_every_edr_line_reaches_disk_after_the_file_table_was_full(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(tmp_path / "edr")],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["flushes_ok"] == [False] * 5  # the flushes did fail...
    during = report["during"]
    assert during["ok"] is False and "Too many open files" in during["error"]
    assert during["write_failures"] >= 5 and during["lines_held"] == report["written"] - 1
    assert report["recovered"] is True and report["after"]["ok"] is True
    assert report["after"]["lost_lines"] == 0
    assert "edr_write_failed" in proc.stderr + proc.stdout  # logged, not silent
    [path] = (tmp_path / "edr").glob("edr-*.csv")
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    assert [r["reason"] for r in rows] == [f"line-{i}" for i in range(1, report["written"] + 1)]
