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
        sys.argv = [f"extrabalance bench {what}", *extra]
        outcome = module.main(extra) if what == "ledger" else asyncio.run(module.main())
        return int(outcome or 0)
    if json_output:
        print(json.dumps(result, sort_keys=True))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            if isinstance(value, float):
                value = f"{value:,.1f}"
            print(f"{key:<{width}}  {value}")
    # A benchmark whose books do not balance has failed, whatever its speed.
    return 1 if result.get("ledger_matches_in") is False else 0
