"""`extrabalance bench …`: run the benchmarks kept in the repository's `bench/`.

Each benchmark measures ours and the peer library side by side in the same run and
reports the ratio, because this kind of machine is shared and noisy: the absolute
figures move from run to run, the ratio much less. `--json` prints one JSON object.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import extrabalance


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "extrabalance": extrabalance.__version__,
    }


def _rows(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [row for key, inner in value.items()
                for row in _rows(inner, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(value, float):
        return [(prefix, f"{value:,.1f}")]
    if isinstance(value, int) and not isinstance(value, bool):
        return [(prefix, f"{value:,}")]
    if isinstance(value, list | tuple):
        return [(prefix, ", ".join(str(v) for v in value))]
    return [(prefix, str(value))]


def format_table(result: dict[str, Any]) -> str:
    """Figures as two aligned columns; nested figures get dotted names
    (`machine.cpu`), numbers are right-aligned with thousands separators."""
    rows = _rows(result)
    name_width = max(len(name) for name, _ in rows)
    numbers = {value for _, value in rows
               if value.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()}
    number_width = max((len(value) for value in numbers), default=0)
    lines = []
    for name, value in rows:
        cell = value.rjust(number_width) if value in numbers else value
        lines.append(f"{name:<{name_width}}  {cell}".rstrip())
    return "\n".join(lines)


def _bench_module(name: str) -> Any:
    root = Path(extrabalance.__file__).resolve().parents[1]
    if (root / "bench").is_dir() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        raise SystemExit(
            f"extrabalance bench: {exc.name} not found; benchmarks run from a source checkout"
        ) from None


def run_bench(what: str, *, json_output: bool, seconds: float, extra: list[str]) -> int:
    # `bench e2e --json` puts --json among the benchmark's own options: honour it too.
    json_output = json_output or "--json" in extra
    if what == "codecs":
        result: dict[str, Any] = {"benchmark": what, "machine": machine()}
        diameter = _bench_module("codecs_diameter")
        result.update(diameter.run(seconds))
        result.update(asyncio.run(diameter.run_roundtrips(seconds)))
        result.update(_bench_module("codecs_smpp").run(seconds))
    elif what == "e2e":
        result = {"benchmark": what, "machine": machine()}
        result.update(_bench_module("e2e").run_cli(extra, seconds=seconds, json_output=json_output))
    else:
        # ledger, recharge: the module parses its own options and prints its own JSON.
        module = _bench_module({"ledger": "ledger", "recharge": "recharge_mqtt"}[what])
        outcome = module.main(extra) if what == "ledger" else module.cli(extra)
        return int(outcome or 0)
    if json_output:
        print(json.dumps(result, sort_keys=True))
    else:
        print(format_table(result))
    # A benchmark whose books do not balance has failed, whatever its speed.
    return 1 if result.get("ledger_matches_in") is False else 0
