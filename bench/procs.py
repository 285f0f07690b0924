"""Process harness for the end-to-end benchmark and the chaos run.

What this file owns: starting the node and the simulator workers as separate OS
processes, each in its own process group (so a kill takes its children too, and a
failed run never leaves strays behind), talking to the workers over JSON lines on
their stdin/stdout, reading CPU seconds from /proc, and writing the node's TOML.

Every process started here is registered with a `ProcessSet`; leaving its `async
with` block kills every group still alive, whatever went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Self

WORKER_READY_TIMEOUT_S = 30.0  # a worker prints its ready line within this
WORKER_CALL_TIMEOUT_S = 120.0  # one control request answered within this
CONTROL_LINE_MAX = 256 * 1024 * 1024  # bytes of one control answer (dumps go to files)
STOP_GRACE_S = 15.0  # SIGTERM, then SIGKILL after this long
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
REPO_ROOT = Path(__file__).resolve().parents[1]  # children import extrabalance, bench, simulators


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one live process (utime + stime of /proc/PID/stat).

    None once the process is gone. Field numbers per proc(5); the command name in
    parentheses may hold spaces, so fields are counted from the closing parenthesis.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Proc:
    """One child process in its own process group."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self.cpu_before_s = 0.0  # CPU seconds of earlier incarnations (restarts)
        self._cpu_last_s = 0.0  # last reading of the current incarnation

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def cpu_s(self) -> float:
        """CPU seconds of every incarnation so far (the last reading once it is gone)."""
        current = cpu_seconds(self.pid) if self.alive else None
        if current is not None:
            self._cpu_last_s = current
        return self.cpu_before_s + self._cpu_last_s

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def kill(self) -> None:
        """SIGKILL to the whole group (a crash); waits until reaped."""
        self.cpu_s()
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await self.process.wait()

    async def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM (graceful stop), SIGKILL after `grace_s`; returns the exit code."""
        if self.alive:
            self.cpu_s()
            self.signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace_s)
            except TimeoutError:
                await self.kill()
        return self.process.returncode

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Worker(Proc):
    """A simulator worker: JSON request line in, JSON answer line out (bench/netsim.py)."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log_path: Path) -> None:
        super().__init__(name, process, log_path)
        self._lock = asyncio.Lock()
        self.ready: dict[str, Any] = {}

    async def _read_json(self, timeout_s: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        while True:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout_s)
            if not line:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}): "
                                   f"{self.log_tail()}")
            text = line.decode(errors="replace").strip()
            if text.startswith("{"):
                value: dict[str, Any] = json.loads(text)
                return value
            # anything else on stdout (a stray print) is not ours: ignore it

    async def call(self, op: str, timeout_s: float = WORKER_CALL_TIMEOUT_S,
                   **args: Any) -> dict[str, Any]:
        """Send one request; return its answer (raises on {"ok": false})."""
        assert self.process.stdin is not None
        async with self._lock:
            self.process.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
            await self.process.stdin.drain()
            answer = await self._read_json(timeout_s)
        if not answer.get("ok", False):
            raise RuntimeError(f"{self.name} {op}: {answer.get('error')}")
        return answer


class ProcessSet:
    """Every process of one run; `async with` guarantees they are all gone after."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.alive:
                with contextlib.suppress(Exception):
                    await proc.stop(grace_s=5.0)
            if proc.alive:  # belt and braces: never leave a stray group
                await proc.kill()

    async def _spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None,
                     control: bool) -> asyncio.subprocess.Process:
        log_path = self.workdir / f"{name}.log"
        log = log_path.open("ab")
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if control else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if control else log,
                stderr=log,
                env=_child_env(env),
                start_new_session=True,  # own process group: killpg reaches its children
                limit=CONTROL_LINE_MAX,
            )
        finally:
            log.close()

    async def start_node(self, config_path: Path, *, env: dict[str, str] | None = None,
                         name: str = "node", profile_path: Path | None = None,
                         clock_start: str | None = None) -> Proc:
        """`python -m extrabalance run --config FILE`, under cProfile when asked."""
        argv = node_argv(config_path, profile_path, clock_start)
        process = await self._spawn(name, argv, env=env, control=False)
        proc = Proc(name, process, self.workdir / f"{name}.log")
        self.procs.append(proc)
        return proc

    async def restart_node(self, proc: Proc, config_path: Path,
                           env: dict[str, str] | None = None) -> None:
        """Start the node again in place of a dead `proc` (keeps its CPU account)."""
        proc.cpu_s()
        proc.cpu_before_s += proc._cpu_last_s
        proc._cpu_last_s = 0.0
        proc.process = await self._spawn(proc.name, node_argv(config_path), env=env,
                                         control=False)

    async def start_worker(self, name: str, args: list[str],
                           env: dict[str, str] | None = None) -> Worker:
        argv = [sys.executable, "-m", "bench.netsim", *args]
        process = await self._spawn(name, argv, env=env, control=True)
        worker = Worker(name, process, self.workdir / f"{name}.log")
        self.procs.append(worker)
        try:
            worker.ready = await worker._read_json(WORKER_READY_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(f"{name} not ready within {WORKER_READY_TIMEOUT_S} s: "
                               f"{worker.log_tail()}") from None
        if not worker.ready.get("ok"):
            raise RuntimeError(f"{name} failed to start: {worker.ready.get('error')}")
        return worker


def node_argv(config_path: Path, profile_path: Path | None = None,
              clock_start: str | None = None) -> list[str]:
    """The node's command line; `EB_BENCH_SWITCH_INTERVAL_MS` sets its GIL switch
    interval (an experiment recorded in docs/benchmarks.md); `clock_start` (ISO 8601)
    starts the node's clock at that instant."""
    run = ["run", "--config", str(config_path)]
    if clock_start is not None:
        run += ["--clock-start", clock_start]
    if profile_path is not None:
        return [sys.executable, "-m", "cProfile", "-o", str(profile_path),
                "-m", "extrabalance", *run]
    switch_ms = os.environ.get("EB_BENCH_SWITCH_INTERVAL_MS")
    if switch_ms:
        prelude = (
            "import sys\n"
            f"sys.setswitchinterval({float(switch_ms) / 1000!r})\n"
            "from extrabalance.cli import main\nsys.exit(main(sys.argv[1:]))\n"
        )
        return [sys.executable, "-c", prelude, *run]
    return [sys.executable, "-m", "extrabalance", *run]


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    return env


# --- the node's TOML ------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}"
                                for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def dump_toml(doc: dict[str, Any]) -> str:
    """A small TOML writer for the node's config shape (tables, arrays of tables)."""
    lines: list[str] = []

    def table(prefix: str, body: dict[str, Any]) -> None:
        plain = {k: v for k, v in body.items()
                 if not isinstance(v, dict) and not _is_table_array(v)}
        for key, value in plain.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        for key, value in body.items():
            name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
            if isinstance(value, dict):
                lines.append(f"\n[{name}]")
                table(name, value)
            elif _is_table_array(value):
                for item in value:
                    lines.append(f"\n[[{name}]]")
                    table(name, item)

    table("", doc)
    return "\n".join(lines) + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
