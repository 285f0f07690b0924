"""Where a USSD loan's CPU goes, by counts that do not depend on the machine's load.

Wall-clock and CPU-time figures are noise on a shared machine; counts are not. This
drives N complete USSD loans (dial `*123#` → pick tier `1` → confirm `1` → the final
screen and the confirmation SMS) through the real node (`Node`, its SQLite ledger) in
this process, against the bundled IN and SMSC simulators over loopback (the demo's
network, `extrabalance.demo.demo_env`), and reports per loan:

- Python function calls, attributed to the layer of the function's source file (smpp,
  diameter, adapters, service, ledger, core, node, asyncio, logging, prometheus, other)
  and to the process part that owns the call: the first node (`extrabalance/`) or
  simulator (`simulators/`) frame on the call stack; calls with neither (the event loop
  turning) are `loop`. Through `sys.setprofile`, so a flat profile still adds up.
- C calls made on behalf of the node that are system calls underneath (socket send and
  receive, selector polls), per owner.
- Memory blocks still allocated per loan (`sys.getallocatedblocks` delta, after a
  garbage collection) and garbage collections run.
- asyncio tasks and futures created (the loop's task factory and `create_future`
  wrapped), by the owner that asked.
- SMPP PDUs and Diameter messages the node exchanged (the simulators' records),
  against the protocol minimum of a USSD loan.
- With ``--strace``: system calls of the whole run (node and simulators, one process)
  from `strace -c -f`, per loan. With ``--callgrind``: the same run under `valgrind
  --tool=callgrind` (deterministic instruction counts), minus a run with no loans,
  per loan. Both re-run this tool in a child process; both say when the tool is missing.

Run: ``python -m bench.cpu_anatomy [--loans 100] [--concurrency 1] [--json]
[--strace] [--callgrind]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOANS_MAX = 5000
CONCURRENCY_MAX = 200
SCREEN_TIMEOUT_S = 30.0
SMS_TIMEOUT_S = 30.0
# A USSD loan at the protocol minimum (SMPP 3.4 §4.4, §4.6; RFC 4006 §5.2):
# 3 deliver_sm + 3 deliver_sm_resp (dial, tier, confirm), 3 submit_sm + 3 submit_sm_resp
# (menu, confirmation screen, final screen), 1 submit_sm + 1 resp (the SMS): 14 PDUs
# (16 when the SMS asks for a delivery receipt; the node does not). Diameter: one CCR/CCA
# to credit the account (REFUND_ACCOUNT), plus the balance check the eligibility rules
# ask for: 4 messages. Ledger: the loan written pending, then settled: 2 writes (2
# fdatasync). Sockets: one send per message out, about one receive per message in.
PROTOCOL_MINIMUM = {"smpp_pdus": 14, "diameter_messages": 4, "ledger_writes": 2,
                    "node_socket_sends": 9, "node_socket_receives": 9}
LAYERS = ("smpp", "diameter", "adapters", "service", "ledger", "core", "node", "asyncio",
          "logging", "prometheus", "simulators", "bench", "other")
OWNERS = ("node", "simulators", "loop", "bench")
SYSCALL_METHODS = frozenset({"send", "sendall", "sendmsg", "recv", "recv_into", "recvfrom",
                             "poll", "select", "control", "write", "read", "fsync",
                             "execute", "executemany", "commit"})


def layer_of(filename: str) -> str:
    """The layer a source file belongs to (see LAYERS)."""
    f = filename.replace("\\", "/")
    if "/extrabalance/" in f:
        rest = f.rsplit("/extrabalance/", 1)[1]
        top = rest.split("/", 1)[0] if "/" in rest else ""
        if top in ("smpp", "diameter", "adapters", "service", "ledger", "core"):
            return top
        return "node"
    if "/simulators/" in f:
        return "simulators"
    if "/bench/" in f:
        return "bench"
    if "/asyncio/" in f or f.endswith(("/selectors.py", "/selector_events.py")):
        return "asyncio"
    if "/logging/" in f or "/structlog/" in f:
        return "logging"
    if "/prometheus_client/" in f:
        return "prometheus"
    return "other"


# Layers whose code only the node runs; smpp/ and diameter/ are shared with the
# simulators (the SMSC simulator is built on the SMPP server, the IN simulator on the
# Diameter peer), so their calls take the owner of what called them.
_OWNER_OF_LAYER = {"adapters": "node", "service": "node", "ledger": "node", "core": "node",
                   "node": "node", "simulators": "simulators", "bench": "bench"}


class Owners:
    """Who a callback the event loop runs belongs to: the task's creator, or for a
    transport's socket callback, the side of the loopback connection."""

    def __init__(self) -> None:
        self.tasks: dict[int, str] = {}
        self.sim_ports: set[int] = set()  # the simulators' listening ports
        self.node_ports: set[int] = set()  # the node's listening ports
        self._socks: dict[int, str] = {}

    def of_socket(self, sock: Any) -> str:
        key = id(sock)
        owner = self._socks.get(key)
        if owner is None:
            try:
                local, peer = sock.getsockname()[1], sock.getpeername()[1]
            except (OSError, IndexError, TypeError):
                return "loop"
            if local in self.sim_ports or peer in self.node_ports:
                owner = "simulators"
            elif local in self.node_ports or peer in self.sim_ports:
                owner = "node"
            else:
                owner = "node"  # the node's MQTT client and the like
            self._socks[key] = owner
        return owner

    def of_frame(self, frame: Any) -> str:
        """The owner of a frame the event loop called with no owner below it: the
        connection its `self` serves, else the owner of the running task."""
        local = frame.f_locals
        for name in ("self", "writer", "transport"):
            owner = self.of_object(local.get(name))
            if owner != "loop":
                return owner
        task = asyncio.current_task() if _loop_running() else None
        return "loop" if task is None else self.tasks.get(id(task), "loop")

    def of_object(self, obj: Any) -> str:
        """The side of the connection an object serves (a transport, a protocol that
        holds one, a stream), else "loop"."""
        if obj is None or not (self.sim_ports or self.node_ports):
            return "loop"
        sock = getattr(obj, "_sock", None)
        if sock is None and hasattr(obj, "get_extra_info"):
            sock = obj.get_extra_info("socket")
        if sock is None:
            for name in ("_transport", "transport", "_writer", "writer", "_reader"):
                inner = getattr(obj, name, None)
                if inner is None:
                    continue
                inner = getattr(inner, "transport", inner)
                get = getattr(inner, "get_extra_info", None)
                sock = get("socket") if get is not None else getattr(inner, "_sock", None)
                if sock is not None:
                    break
        return "loop" if sock is None else self.of_socket(sock)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class CallCounter:
    """A `sys.setprofile` hook: Python calls per (owner, layer), and the C calls that
    are system calls underneath per owner. The owner of a call is the owner of the
    nearest node/simulator/bench frame below it on the stack, else of the task or the
    socket the event loop is serving; coroutine resumes and suspends are call/return
    events, so the stack stays paired across awaits."""

    def __init__(self, owners: Owners) -> None:
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self.syscalls: collections.Counter[tuple[str, str]] = collections.Counter()
        self._layers: dict[Any, str] = {}
        self._stack: list[str] = []
        self._owners = owners
        self.quiet: set[Any] = set()  # the counters' own wrappers: not counted
        self.loop_turns = 0
        self._run_once = asyncio.BaseEventLoop._run_once.__code__  # type: ignore[attr-defined]

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        stack = self._stack
        if event == "call":
            code = frame.f_code
            if code in self.quiet or (stack and stack[-1] == "quiet"):
                stack.append("quiet")
                return
            if code is self._run_once:
                self.loop_turns += 1
            layer = self._layers.get(code)
            if layer is None:
                layer = self._layers[code] = layer_of(code.co_filename)
            owner = _OWNER_OF_LAYER.get(layer)
            if owner is None:
                owner = stack[-1] if stack else "loop"
                if owner == "loop":
                    owner = self._owners.of_frame(frame)
            stack.append(owner)
            self.calls[owner, layer] += 1
        elif event == "return":
            if stack:
                stack.pop()
        elif event == "c_call":
            name = getattr(arg, "__name__", "")
            if name in SYSCALL_METHODS and not (stack and stack[-1] == "quiet"):
                self.syscalls[stack[-1] if stack else "loop", name] += 1


class AsyncCounter:
    """Tasks and futures created, by owner (the code that asked for them). Installed
    before the network starts, so every task's owner is known; counts only while
    `counting`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, owners: Owners) -> None:
        self.tasks: collections.Counter[str] = collections.Counter()
        self.futures: collections.Counter[str] = collections.Counter()
        self.counting = False
        self._loop = loop
        self._owners = owners
        self._create_future = loop.create_future
        self._factory = loop.get_task_factory()

    def install(self) -> None:
        loop, counter, owners = self._loop, self, self._owners

        def create_future() -> asyncio.Future[Any]:
            if counter.counting:
                counter.futures[stack_owner(owners)] += 1
            return counter._create_future()

        def task_factory(lp: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
            owner = stack_owner(owners)
            if counter.counting:
                counter.tasks[owner] += 1
            if counter._factory is not None:
                task = counter._factory(lp, coro, **kwargs)
            else:
                task = asyncio.Task(coro, loop=lp, **kwargs)
            if owner != "loop":
                owners.tasks[id(task)] = owner
            task.add_done_callback(lambda t: owners.tasks.pop(id(t), None))
            return task

        loop.create_future = create_future  # type: ignore[method-assign]
        loop.set_task_factory(task_factory)

    def wrapper_codes(self) -> set[Any]:
        return {self._loop.create_future.__code__,
                self._loop.get_task_factory().__code__}  # type: ignore[union-attr]

    def uninstall(self) -> None:
        self._loop.create_future = self._create_future  # type: ignore[method-assign]
        self._loop.set_task_factory(self._factory)


def stack_owner(owners: Owners) -> str:
    """The owner of the caller of a task factory or create_future: the nearest
    node/simulator/bench frame, else the connection a frame below serves."""
    frame = sys._getframe(2)
    while frame is not None:
        owner = _OWNER_OF_LAYER.get(layer_of(frame.f_code.co_filename))
        if owner is not None:
            return owner
        owner = owners.of_object(frame.f_locals.get("self"))
        if owner != "loop":
            return owner
        frame = frame.f_back  # type: ignore[assignment]
    return owners.of_frame(sys._getframe(1))


def subscribers(count: int) -> list[str]:
    """`count` MSISDNs on the first IN node's range, away from the demo's three."""
    return [f"2010020{i:05d}" for i in range(count)]


async def _one_loan(env: Any, msisdn: str) -> None:
    phone = env.smsc.handset(msisdn)
    screen = await phone.dial("*123#", timeout_s=SCREEN_TIMEOUT_S)
    if screen.final:
        raise RuntimeError(f"{msisdn}: the menu ended the dialog: {screen.text!r}")
    screen = await phone.reply("1", timeout_s=SCREEN_TIMEOUT_S)
    if screen.final:
        raise RuntimeError(f"{msisdn}: no confirmation screen: {screen.text!r}")
    screen = await phone.reply("1", timeout_s=SCREEN_TIMEOUT_S)
    if not screen.final or not screen.text.startswith("Done"):
        raise RuntimeError(f"{msisdn}: the loan was not granted: {screen.text!r}")
    await phone.next_sms(SMS_TIMEOUT_S)


async def _loans(env: Any, msisdns: list[str], concurrency: int) -> None:
    queue = list(reversed(msisdns))

    async def worker() -> None:
        while queue:
            await _one_loan(env, queue.pop())

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def _wire_counts(env: Any, mt0: int, in0: int, msisdns: set[str]) -> dict[str, int]:
    """PDUs and Diameter messages the node exchanged for these loans, from the
    simulators' records (each request has its response)."""
    mt = [r for r in env.smsc.mt()[mt0:] if getattr(r, "msisdn", None) in msisdns
          or getattr(r, "destination_addr", None) in msisdns]
    stats = getattr(env.smsc, "stats", {}) or {}
    ops = [op for op in env.in_sim.applied()[in0:] if op.msisdn in msisdns]
    loans = len(msisdns)
    receipts = int(stats.get("receipts", 0))
    # Each MO step is one deliver_sm and its resp; each MT one submit_sm and its resp.
    return {"submit_sm": len(mt), "deliver_sm_mo": 3 * loans, "delivery_receipts": receipts,
            "smpp_pdus": 2 * (len(mt) + 3 * loans + receipts),
            "diameter_ccr": len(ops), "diameter_messages": 2 * len(ops)}


async def measure(loans: int, concurrency: int, workdir: Path) -> dict[str, Any]:
    """Run `loans` USSD loans (after one warm-up loan) and count what they cost."""
    from extrabalance.demo import demo_env
    from extrabalance.ledger.profiles import import_profiles

    msisdns = subscribers(loans + 1)
    profiles = workdir / "bench-profiles.csv"
    profiles.write_text("msisdn,tenure_days,arpu_minor,language\n"
                        + "".join(f"{m},400,5000,en\n" for m in msisdns), encoding="utf-8")
    report = import_profiles(workdir / "extrabalance.db", profiles, progress=False)
    if report.bad_rows:
        raise RuntimeError(f"generated profiles rejected: {report.bad_rows[:5]}")
    restore_logs = _quiet_logs()
    loop = asyncio.get_running_loop()
    owners = Owners()
    aio = AsyncCounter(loop, owners)
    aio.install()
    try:
        # The demo's network, without the demo's limits from behaviour: the figures
        # stay those of the plain borrow and payback paths.
        async with demo_env(workdir, {"limits": {"enabled": False}}) as env:
            owners.sim_ports = {env.smsc.port, *(p.port for n in env.settings.in_nodes
                                                  for p in n.peers)}
            owners.node_ports = {env.settings.diameter.listen_port}
            for m in msisdns:
                env.in_sim.set_balance(m, 0)
            warm, measured = msisdns[0], msisdns[1:]
            await _one_loan(env, warm)  # imports, caches, first statements prepared
            await asyncio.sleep(0.2)
            # The admin page's once-a-second rate sampler is idle cost, not loan cost,
            # and would be charged per loan in proportion to how slow this run is.
            if env.node.admin is not None:
                await env.node.admin.sampler.stop()
            mt0, in0 = len(env.smsc.mt()), len(env.in_sim.applied())
            receipts0 = int((getattr(env.smsc, "stats", {}) or {}).get("receipts", 0))
            calls = CallCounter(owners)
            calls.quiet = aio.wrapper_codes()
            gc.collect()
            blocks0 = sys.getallocatedblocks()
            gcs0 = sum(s["collections"] for s in gc.get_stats())
            aio.counting = True
            sys.setprofile(calls)
            try:
                await _loans(env, measured, concurrency)
                await asyncio.sleep(0.2)  # the last receipts
            finally:
                sys.setprofile(None)
                aio.counting = False
            gcs = sum(s["collections"] for s in gc.get_stats()) - gcs0
            gc.collect()
            blocks = sys.getallocatedblocks() - blocks0
            wire = _wire_counts(env, mt0, in0, set(measured))
            wire["delivery_receipts"] -= receipts0
            wire["smpp_pdus"] -= 2 * receipts0
    finally:
        aio.uninstall()
        restore_logs()
    return _report(loans, concurrency, calls, aio, blocks, gcs, wire)


def _per(value: float, loans: int) -> float:
    return round(value / loans, 1)


def _report(loans: int, concurrency: int, calls: CallCounter, aio: AsyncCounter,
            blocks: int, gcs: int, wire: dict[str, int]) -> dict[str, Any]:
    by_owner: dict[str, dict[str, float]] = {}
    for owner in OWNERS:
        row = {layer: _per(calls.calls[owner, layer], loans) for layer in LAYERS
               if calls.calls[owner, layer]}
        if row:
            row["total"] = _per(sum(calls.calls[owner, la] for la in LAYERS), loans)
            by_owner[owner] = row
    sys_calls: dict[str, dict[str, float]] = {}
    for (owner, name), n in sorted(calls.syscalls.items()):
        sys_calls.setdefault(owner, {})[name] = _per(n, loans)
    per_loan_wire = {k: _per(v, loans) for k, v in wire.items()}
    return {
        "bench": "cpu_anatomy",
        "loans": loans,
        "concurrency": concurrency,
        "python_calls_per_loan": by_owner,
        "syscall_methods_per_loan": sys_calls,
        "loop_turns_per_loan": _per(calls.loop_turns, loans),
        "tasks_per_loan": {k: _per(v, loans) for k, v in sorted(aio.tasks.items())},
        "futures_per_loan": {k: _per(v, loans) for k, v in sorted(aio.futures.items())},
        "blocks_kept_per_loan": _per(blocks, loans),
        "gc_collections_per_loan": round(gcs / loans, 2),
        "wire_per_loan": per_loan_wire,
        "protocol_minimum_per_loan": PROTOCOL_MINIMUM,
    }


# --- child runs under strace / valgrind -------------------------------------------------

def _child_argv(loans: int, concurrency: int) -> list[str]:
    return [sys.executable, "-m", "bench.cpu_anatomy", "--loans", str(loans),
            "--concurrency", str(concurrency), "--json", "--no-counters"]


def strace_per_loan(loans: int, concurrency: int) -> dict[str, Any]:
    """System calls of a whole run (node and simulators) minus a run of `concurrency`
    loans, per loan."""
    strace = shutil.which("strace")
    if strace is None:
        return {"available": False, "why": "strace is not installed"}
    totals = []
    for n in (concurrency, loans + concurrency):
        with tempfile.NamedTemporaryFile(prefix="strace-", suffix=".txt") as out:
            proc = subprocess.run([strace, "-c", "-f", "-o", out.name,
                                   *_child_argv(n, concurrency)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                return {"available": False, "why": f"strace run failed: {proc.stderr[-500:]}"}
            totals.append(parse_strace_summary(Path(out.name).read_text()))
    few, many = totals
    per_loan = {name: round((many.get(name, 0) - few.get(name, 0)) / loans, 1)
                for name in many if many.get(name, 0) - few.get(name, 0) > 0}
    top = dict(sorted(per_loan.items(), key=lambda kv: -kv[1])[:12])
    return {"available": True, "per_loan": top,
            "total_per_loan": round(sum(per_loan.values()), 1)}


def parse_strace_summary(text: str) -> dict[str, int]:
    """`strace -c` table → {syscall: calls}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and re.fullmatch(r"[\d.]+", parts[0]) and parts[-1] != "total":
            with contextlib.suppress(ValueError):
                out[parts[-1]] = int(parts[3])
    return out


def callgrind_per_loan(loans: int, concurrency: int) -> dict[str, Any]:
    """Instructions (Ir) of a whole run under callgrind minus a run of `concurrency`
    loans (start-up, the first loans' warm-up), per loan."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return {"available": False, "why": "valgrind is not installed"}
    totals = []
    for n in (concurrency, loans + concurrency):
        with tempfile.TemporaryDirectory(prefix="callgrind-") as tmp:
            out = Path(tmp) / "callgrind.out"
            proc = subprocess.run([valgrind, "--tool=callgrind", f"--callgrind-out-file={out}",
                                   *_child_argv(n, concurrency)],
                                  capture_output=True, text=True, check=False,
                                  env={**os.environ, "PYTHONMALLOC": "malloc"})
            if proc.returncode != 0:
                return {"available": False, "why": f"callgrind run failed: {proc.stderr[-500:]}"}
            totals.append(parse_callgrind_total(out.read_text(errors="replace")))
    return {"available": True, "instructions_per_loan": round((totals[1] - totals[0]) / loans),
            "note": "node and simulators in one process"}


def parse_callgrind_total(text: str) -> int:
    """The `summary:` / `totals:` line of a callgrind output file."""
    for line in text.splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError("no summary line in the callgrind output")


# --- output -------------------------------------------------------------------------------

def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the report."""
    lines = [f"USSD loans: {result['loans']} (concurrency {result['concurrency']}), per loan"]
    calls = result.get("python_calls_per_loan", {})
    if calls:
        owners = [o for o in OWNERS if o in calls]
        lines.append("Python calls  " + "".join(f"{o:>12}" for o in owners))
        for layer in (*LAYERS, "total"):
            if any(layer in calls[o] for o in owners):
                lines.append(f"  {layer:<12}" + "".join(
                    f"{calls[o].get(layer, 0):>12,.1f}" for o in owners))
        for key in ("syscall_methods_per_loan", "loop_turns_per_loan", "tasks_per_loan",
                    "futures_per_loan"):
            lines.append(f"{key}: " + json.dumps(result[key]))
        lines.append(f"memory blocks kept per loan: {result['blocks_kept_per_loan']}; "
                     f"gc collections per loan: {result['gc_collections_per_loan']}")
        wire = result["wire_per_loan"]
        minimum = result["protocol_minimum_per_loan"]
        lines.append(f"SMPP PDUs per loan: {wire['smpp_pdus']} (minimum {minimum['smpp_pdus']}); "
                     f"Diameter messages: {wire['diameter_messages']} "
                     f"(minimum {minimum['diameter_messages']})")
    for key in ("strace", "callgrind"):
        if key in result:
            lines.append(f"{key}: " + json.dumps(result[key]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_anatomy",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--loans", type=int, default=100, help="USSD loans measured")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="subscribers borrowing at once")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--strace", action="store_true",
                        help="also count system calls per loan with strace -c -f")
    parser.add_argument("--callgrind", action="store_true",
                        help="also count instructions per loan under valgrind callgrind")
    parser.add_argument("--no-counters", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.loans <= LOANS_MAX:
        parser.error(f"--loans must be within 1..{LOANS_MAX}")
    if not 1 <= args.concurrency <= min(CONCURRENCY_MAX, args.loans):
        parser.error(f"--concurrency must be within 1..min({CONCURRENCY_MAX}, --loans)")
    if args.no_counters:  # a child run under strace/valgrind: the loans, nothing else
        with tempfile.TemporaryDirectory(prefix="bench-anatomy-") as tmp:
            asyncio.run(_plain_run(args.loans, args.concurrency, Path(tmp)))
        return 0
    # The node's own log lines go to stderr, so stdout is the report alone.
    with tempfile.TemporaryDirectory(prefix="bench-anatomy-") as tmp, \
            contextlib.redirect_stdout(sys.stderr):
        result = asyncio.run(measure(args.loans, args.concurrency, Path(tmp)))
    if args.strace:
        result["strace"] = strace_per_loan(args.loans, args.concurrency)
    if args.callgrind:
        result["callgrind"] = callgrind_per_loan(args.loans, args.concurrency)
    result["command"] = "python -m bench.cpu_anatomy " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


async def _plain_run(loans: int, concurrency: int, workdir: Path) -> None:
    from extrabalance.demo import demo_env
    from extrabalance.ledger.profiles import import_profiles

    msisdns = subscribers(loans)
    profiles = workdir / "bench-profiles.csv"
    profiles.write_text("msisdn,tenure_days,arpu_minor,language\n"
                        + "".join(f"{m},400,5000,en\n" for m in msisdns), encoding="utf-8")
    import_profiles(workdir / "extrabalance.db", profiles, progress=False)
    restore_logs = _quiet_logs()
    try:
        async with demo_env(workdir, {"limits": {"enabled": False}}) as env:  # as before
            for m in msisdns:
                env.in_sim.set_balance(m, 0)
            await _loans(env, msisdns, concurrency)
    finally:
        restore_logs()


def _quiet_logs() -> Callable[[], None]:
    """No node logging below WARNING while counting, as in production at load. Returns
    what puts the caller's environment back: the tests run this in-process, and a
    level left behind silences every node a later test starts."""
    before = os.environ.get("EB_LOG_LEVEL")
    os.environ.setdefault("EB_LOG_LEVEL", "WARNING")

    def restore() -> None:
        if before is None:
            os.environ.pop("EB_LOG_LEVEL", None)

    return restore


if __name__ == "__main__":
    sys.exit(main())
