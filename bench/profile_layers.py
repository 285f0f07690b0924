"""Where a node's CPU goes, per layer, from a sampling profile of the running process.

py-spy comes with the project's `profile` extra (`pip install -e '.[profile]'`); it
reads another process's memory, so it runs as root or as the node's own user.

    py-spy record --pid NODE_PID --duration 10 --rate 250 --nonblocking \\
        --format raw --output node.txt
    python -m bench.profile_layers node.txt --per-op-ms 1.0

`py-spy`'s raw format is one line per distinct stack, `frame;frame;...;frame COUNT`
with the outermost frame first, each frame `function (file:line)`. Each sample is
charged to the layer of the node's own frame nearest the top of its stack, so a C call
(SQLite's `execute`, a socket `send`) counts for the Python function that made it; a
sample whose stack holds no frame of the node's package but its entry (`__main__`,
`cli`, `run_node`) is the event loop's own work (`asyncio`: uvloop's C code shows as
its caller, `asyncio.Runner.run`), or `other` when not even the loop is in it.
With `--per-op-ms` (the node's CPU per loan of the same run) the shares are scaled
to microseconds per loan. A profile is a sample: shares under about 1 % move from run
to run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

# The first prefix that matches a frame's file names its layer; order matters
# (adapters before the package's top level).
LAYERS: tuple[tuple[str, str], ...] = (
    ("extrabalance/ledger/", "ledger"),
    ("extrabalance/smpp/", "SMPP"),
    ("extrabalance/diameter/", "Diameter"),
    ("extrabalance/adapters/", "adapters"),
    ("extrabalance/service/", "service"),
    ("extrabalance/core/", "core"),
    ("extrabalance/recharge/", "recharge (MQTT)"),
    ("extrabalance/observability.py", "metrics, logging"),
    ("extrabalance/", "node, other"),
)
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FILE = re.compile(r"\((?P<file>[^():]+)(?::\d+)?\)$")
_LOOP_FILES = ("asyncio/", "uvloop/", "selectors.py")
# The process's entry frames, under every stack: not a layer of their own (a sample
# whose only node frames are these is the event loop's, uvloop's C code included).
_ENTRY_FRAMES = ("extrabalance/__main__.py", "extrabalance/cli.py", "run_node (extrabalance/")


def layer_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # innermost first
        m = _FILE.search(frame.strip())
        if m is None or any(entry in frame for entry in _ENTRY_FRAMES):
            continue
        path = m.group("file").replace("\\", "/")
        for prefix, name in LAYERS:
            if prefix in path:
                return name
    if any(marker in stack for marker in _LOOP_FILES):
        return "asyncio"
    return "other"


def tally(lines: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in lines:
        m = _LINE.match(line.rstrip("\n"))
        if m:
            counts[layer_of(m.group("stack"))] += int(m.group("count"))
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile", help="py-spy --format raw output")
    p.add_argument("--per-op-ms", type=float, default=None,
                   help="the node's CPU ms per operation in the same run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        lines = Path(args.profile).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        print(f"profile_layers: {exc}", file=sys.stderr)
        return 2
    counts = tally(lines)
    total = sum(counts.values())
    if total == 0:
        print("profile_layers: no samples in the file (is it py-spy's raw format?)",
              file=sys.stderr)
        return 2
    rows = [{"layer": name, "samples": n, "share": round(n / total, 4),
             "us_per_op": (round(n / total * args.per_op_ms * 1000)
                           if args.per_op_ms else None)}
            for name, n in counts.most_common()]
    if args.json:
        print(json.dumps({"samples": total, "layers": rows}, indent=2))
        return 0
    print(f"{total} samples")
    for row in rows:
        us = f"{row['us_per_op']:>6} µs" if row["us_per_op"] is not None else ""
        print(f"{row['layer']:<20} {row['share'] * 100:5.1f} % {us}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
