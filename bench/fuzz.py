"""`extrabalance fuzz`: malformed Diameter, SMPP and MQTT input against a running node.

The node runs in its own process (so its memory can be measured alone), wired as in
production to real peers on 127.0.0.1: the bundled IN simulator (Diameter peer and
recharge publisher), a private Mosquitto (or the demo broker when Mosquitto is
missing), and the fuzzer's own SMSC, to which the node binds as an ESME. Then:

* Diameter: several connections that completed CER/CEA as an allowed IN peer get
  pipelined batches of mutated CCRs (bit flips, truncation, bad AVP lengths and
  flags, unknown M-bit AVPs, duplicates, missing AVPs, bad and too deep grouped
  AVPs, huge lengths, bad header fields and values, random bodies), each batch
  closed by a valid CCR whose answer must be right (4012, no grant). Every request
  must get one answer whose Result-Code is one the RFCs name for it, with the E bit
  exactly on 3xxx. Other connections get framing the node cannot recover from
  (wrong version, impossible lengths, random bytes), with and without CER, and CERs
  from unknown peers: each must be closed, and only that one.
* SMPP: on every bind the node opened, batches of mutated deliver_sm / data_sm /
  unknown PDUs, each closed by a valid "HELP" SMS; every request needs a response
  (deliver_sm_resp with any status, or generic_nack) and the bind must stay up.
  Now and then a command_length below 16 must cost that bind only: the node binds
  again.
* MQTT: malformed recharge payloads on the recharge topic (each must reach the
  dead-letter topic), with valid recharges for real debtors in between (each must be
  paid back through the IN).

Checks: the node process never exits; VmRSS growth stays under a stated bound; no
answer outside the allowed sets; the ledger moved only for the valid recharges
(no new loan, journal balanced, every recovery is one of ours and matches what the
IN debited). Run: `python -m extrabalance fuzz [--frames N] [--seconds S] [--seed N]`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.fuzz_frames import (
    DIAMETER_ALLOWED_RESULTS,
    DiameterFrames,
    RechargePayloads,
    SmppFrames,
)
from bench.fuzz_peers import CLOSE_WAIT_S, DiameterConn, FuzzSmsc, RssSampler, rss_kib
from extrabalance.argparsing import Parser
from extrabalance.diameter.peer import CAPABILITIES_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
QUIET_MQTT_LOG = logging.getLogger("eb.fuzz.mqtt")
QUIET_MQTT_LOG.setLevel(logging.ERROR)
SMPP_PASSWORD_ENV = "EB_FUZZ_SMPP_PASSWORD"
DEBTORS = tuple(f"2010003000{i:02d}" for i in range(20))  # in-a's range, with profiles
CHECK_CCR_MSISDN = "201000400001"  # in range, no opt-in: a valid CCR gets 4012
CHECK_CCR_MSISDNS = 10_000  # the batches' check CCRs rotate over this many such numbers


def check_ccr_msisdn(n: int) -> str:
    """In in-a's range, no profile, no opt-in: 4012. One per batch, in turn, so that
    the check measures the admitted path rather than one subscriber's bound of 2."""
    return f"20100041{n % CHECK_CCR_MSISDNS:04d}"
CHECK_SMS_MSISDN = "201000400002"  # sends "HELP" between fuzz batches
LOAN_TEXT = "LOAN 5"
PROBE = b"probe: not a recharge"
PROBE_B64 = base64.b64encode(PROBE)
RECHARGE_MINOR = 100
ANSWER_WAIT_S = 15.0  # a batch's answers; the node is loaded, not stuck, below this
START_WAIT_S = 30.0
PUBLISH_WAIT_S = 120.0  # the fuzzer's own QoS 1 publishes
DRAIN_STALL_S = 30.0  # no dead letter for this long while some are missing: stop waiting
CER_ATTEMPTS_MAX = 3  # a lane's CER unanswered this many times ends the run
# RSS growth allowed over the run: the node's bounded tables when full (duplicate
# answers 65,536, sent-SMS ids 100,000, USSD dialogs, idempotency is on disk) fit well
# under it; a leak of even 100 bytes per frame over 1M frames does not.
RSS_GROWTH_MAX_MIB = 96
# Fuzz-only probes of the node process (bench code, never the production path): with
# PROBE_DIR_ENV set the node child writes its counters on SIGUSR1 and after stop; with
# TRACEMALLOC_ENV=<frames> too it traces allocations and dumps the top sites on SIGUSR1.
PROBE_DIR_ENV = "EB_FUZZ_PROBE_DIR"
TRACEMALLOC_ENV = "EB_FUZZ_TRACEMALLOC"
TRIM_ENV = "EB_FUZZ_MALLOC_TRIM"  # set: each probe also calls malloc_trim(0) and re-reads RSS


@dataclass
class FuzzConfig:
    frames: int = 1_000_000
    seconds: float | None = None  # stop earlier when this much time has passed
    seed: int = 1
    diameter_share: float = 0.7
    smpp_share: float = 0.2  # the rest is MQTT
    diameter_connections: int = 8
    diameter_batch: int = 100
    diameter_window: int = 1000  # answers outstanding per connection (node bound: 2048)
    kill_every: int = 100  # one fatal-framing Diameter connection per this many frames
    smpp_binds: int = 2
    smpp_batch: int = 60
    smpp_kill_every: int = 20_000
    mqtt_inflight: int = 200
    mqtt_valid_every: int = 200
    rss_growth_max_mib: float = RSS_GROWTH_MAX_MIB
    node_log_level: str = "ERROR"
    # Node counters (and, with EB_FUZZ_TRACEMALLOC set, allocation dumps in the work
    # dir's probes/ folder) every this many seconds; None: only at the end.
    probe_every_s: float | None = None
    keep: bool = False


@dataclass
class LaneStats:
    sent: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    mutations: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    extra: Counter[str] = field(default_factory=Counter)

    def fail(self, text: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(text)
        self.extra["failures"] += 1


@dataclass
class FuzzReport:
    config: dict[str, Any]
    seconds: float = 0.0
    diameter: LaneStats = field(default_factory=LaneStats)
    smpp: LaneStats = field(default_factory=LaneStats)
    mqtt: LaneStats = field(default_factory=LaneStats)
    node_crashed: bool = False
    node_exit_code: int | None = None
    rss_start_kib: int = 0
    rss_peak_kib: int = 0
    rss_end_kib: int = 0
    rss_curve_mib: list[float] = field(default_factory=list)  # at 10 %, 20 %, … of the run
    ledger: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    stderr_tail: str = ""
    probes: list[dict[str, Any]] = field(default_factory=list)  # node counters during the run
    node_counters_at_stop: dict[str, Any] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return self.diameter.sent + self.smpp.sent + self.mqtt.sent

    @property
    def ok(self) -> bool:
        return all(self.checks.values())


def no_nagle(client: Any) -> None:
    """TCP_NODELAY on an aiomqtt client's socket (paho leaves Nagle on; the node's
    listener turns it off too): the fuzzer's publisher and watcher must not be the
    bottleneck they are measuring."""
    sock = client._client.socket()
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the node in its own process ---------------------------------------------------------


def node_child(overrides_path: str) -> int:
    """Child entry: the node from the embedded config plus the fuzzer's overrides."""
    import logging

    from extrabalance.config import load_settings
    from extrabalance.node import Node, serve
    from extrabalance.observability import configure_logging

    overrides = json.loads(Path(overrides_path).read_text(encoding="utf-8"))
    settings = load_settings(None, overrides)
    level = os.environ.get("EB_LOG_LEVEL", "ERROR")
    configure_logging(mask_msisdn_in_logs=settings.node.mask_msisdn_in_logs, level=level)
    logging.basicConfig(level=level, stream=sys.stderr)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass

    probe_dir = os.environ.get(PROBE_DIR_ENV)
    trace_frames = int(os.environ.get(TRACEMALLOC_ENV, "0") or 0)
    if probe_dir and trace_frames > 0:
        import tracemalloc

        tracemalloc.start(trace_frames)

    async def main() -> None:
        node = Node(settings)
        signals = {}
        if probe_dir:
            probes = iter(range(1, 1 << 30))
            signals[signal.SIGUSR1] = lambda: write_probe(node, Path(probe_dir), next(probes))
        await serve(node, signals=signals)
        if probe_dir:
            write_probe(node, Path(probe_dir), 0, allocations=False)  # 0: after stop

    asyncio.run(main())
    return 0


def node_counters(node: Any) -> dict[str, Any]:
    """What the fuzzer reads from the node process: its listeners', Gy server's and
    SMPP channel's counters, and the sizes of its bounded tables."""
    return {
        "recharge_listener": node.recharges.stats(),
        "lowbalance_listener": node.low_balance.stats(),
        "gy": {**node.gy.stats, "inflight": node.gy.inflight},
        "smpp_channel": {**node.channel.stats, **node.sms.stats,
                         "inflight": node.channel.inflight,
                         "sent_tracked": node.sms.sent_tracked},
        "asyncio_tasks": len(asyncio.all_tasks()),
        "recharge_head": _listener_head(node.recharges),
    }


def _memory_map_kib() -> dict[str, int]:
    """Resident KiB by kind of mapping: the brk heap, anonymous maps (glibc's per-thread
    arenas, large blocks), files (code, SQLite's mmap)."""
    out: Counter[str] = Counter()
    kind = "other"
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
            for line in f:
                first = line.split(maxsplit=6)
                if len(first) >= 5 and "-" in first[0] and ":" not in first[0]:
                    name = first[5].strip() if len(first) > 5 else ""
                    kind = ("heap" if name == "[heap]" else "anonymous" if not name
                            else "stack" if name.startswith("[stack") else "file"
                            if name.startswith("/") else "other")
                elif line.startswith("Rss:"):
                    out[kind] += int(line.split()[1])
    except OSError:
        pass
    return dict(out)


def _listener_head(listener: Any) -> dict[str, Any] | None:
    """The oldest unacknowledged recharge message and where its handler is waiting
    (diagnosis only: it reads the listener's private delivery queue)."""
    deliveries = getattr(listener, "_deliveries", None)
    if not deliveries:
        return None
    head = deliveries[0]
    stack = head.task.get_stack(limit=30) if not head.task.done() else []
    paho_state: dict[str, Any] = {}
    client = getattr(listener, "_session_client", None)
    inner = getattr(client, "_client", None)
    if inner is not None:
        paho_state = {"out_packets": len(inner._out_packet), "out_messages": len(
            inner._out_messages), "inflight_out": inner._inflight_messages,
            "registered_write": inner._registered_write, "want_write": inner.want_write(),
            "pending_publishes": len(getattr(client, "_pending_publishes", ()))}
    return {"paho": paho_state, "topic": head.message.topic, "payload": bytes(head.message.payload[:120]).decode(
                "utf-8", "replace"), "done": head.task.done(),
            "stack": [f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} {f.f_code.co_name}"
                      for f in stack]}


def write_probe(node: Any, directory: Path, n: int, *, allocations: bool = True) -> None:
    """On SIGUSR1 (fuzz runs only): counters to probe-<n>.json and, when tracemalloc
    runs, the top allocation sites to tracemalloc-<n>.txt. Never on the node's own
    production path: only `node_child` installs it, and only with the env var set."""
    import gc
    import tracemalloc

    try:
        counters = node_counters(node)
    except Exception as exc:  # noqa: BLE001 - a probe must never be lost to its own bug
        counters = {"probe_error": repr(exc)}
    objects = gc.get_objects()
    counters["gc_objects"] = len(objects)
    by_type = Counter(type(o).__qualname__ for o in objects)
    counters["gc_top_types"] = by_type.most_common(25)
    del objects
    counters["rss_kib"] = rss_kib(os.getpid())
    counters["memory_map_kib"] = _memory_map_kib()
    if os.environ.get(TRIM_ENV):
        # How much of the RSS is memory the C allocator holds but Python has freed.
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        counters["rss_after_malloc_trim_kib"] = rss_kib(os.getpid())
    text = json.dumps(counters, default=str)
    tmp = directory / f".probe-{n}.json"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(directory / f"probe-{n}.json")
    if not (allocations and tracemalloc.is_tracing()):
        return
    snapshot = tracemalloc.take_snapshot().filter_traces((
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    ))
    traced_mib = tracemalloc.get_traced_memory()[0] / 2**20
    lines = [f"probe {n}: rss {counters['rss_kib']} KiB, traced {traced_mib:.1f} MiB"]
    for stat in snapshot.statistics("lineno")[:40]:
        lines.append(f"{stat.size / 2**20:8.2f} MiB {stat.count:9d}  {stat.traceback[0]}")
    lines.append("--- top 8 by traceback")
    for stat in snapshot.statistics("traceback")[:8]:
        lines.append(f"{stat.size / 2**20:8.2f} MiB {stat.count:9d}")
        lines.extend("      " + line for line in stat.traceback.format(limit=12))
    (directory / f"tracemalloc-{n}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


class NodeProcess:
    def __init__(self, workdir: Path, overrides: dict[str, Any], env: dict[str, str],
                 log_level: str) -> None:
        self.overrides_path = workdir / "node-overrides.json"
        self.overrides_path.write_text(json.dumps(overrides), encoding="utf-8")
        self.stderr_path = workdir / "node.stderr"
        self.env = {**os.environ, **env, "EB_LOG_LEVEL": log_level,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                os.environ.get("PYTHONPATH")]))}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.fuzz", "node-child", str(self.overrides_path)],
                cwd=ROOT, env=self.env, stdout=err, stderr=err, stdin=subprocess.DEVNULL)
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stderr_tail(self, chars: int = 3000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# --- the run -----------------------------------------------------------------------------


class FuzzRun:
    def __init__(self, cfg: FuzzConfig, workdir: Path) -> None:
        from extrabalance.config import load_settings

        self.cfg = cfg
        self.workdir = workdir
        self.base = load_settings()
        self.rng = random.Random(cfg.seed)
        self.report = FuzzReport(config=asdict(cfg))
        self.deadline: float | None = None
        self.node: NodeProcess | None = None
        self.in_sim: Any = None
        self.smsc: FuzzSmsc | None = None
        self.valid_event_ids: set[str] = set()
        self.dead_letters = 0
        self.probes_sent = 0
        self.check_ccrs = 0
        self.probe_lock = asyncio.Lock()
        self.probe_dir = workdir / "probes"
        self.probe_dead_letters = 0
        self.dead_letter_event = asyncio.Event()
        in_a = self.base.in_nodes[0]
        self.in_a = in_a
        b = self.base
        self.dframes = DiameterFrames(
            random.Random(cfg.seed * 7 + 1), origin_host=in_a.origin_host,
            origin_realm=in_a.realm, destination_realm=b.node.origin_realm,
            service_context_id=b.diameter.service_context_id,
            currency_numeric=b.node.currency_numeric, currency_exponent=b.node.currency_exponent)
        self.sframes = SmppFrames(random.Random(cfg.seed * 7 + 2),
                                  short_code=b.smpp.short_code, ussd_code=b.smpp.ussd_code)
        self.payloads = RechargePayloads(random.Random(cfg.seed * 7 + 3), in_a.origin_host)

    def time_left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline

    # -- environment ----------------------------------------------------------------

    async def setup(self, stack: contextlib.AsyncExitStack) -> None:
        from extrabalance.demo_broker import DemoBroker
        from extrabalance.ledger.profiles import import_profiles
        from extrabalance.mosquitto import MosquittoBroker, find_mosquitto
        from simulators.in_node import InNodeSpec, InSimulator, MqttTarget, MsisdnRange, NodePeer

        b = self.base
        if find_mosquitto() is not None:
            broker = MosquittoBroker(self.workdir / "mosquitto")
            broker.start()
            stack.callback(broker.stop)
            self.mqtt_port = broker.port
            self.report.ledger["broker"] = "mosquitto"
        else:
            demo = DemoBroker()
            self.mqtt_port = await demo.start()
            stack.push_async_callback(demo.stop)
            self.report.ledger["broker"] = "in-process demo broker"
        dport = free_port()
        self.diameter_port = dport
        self.in_sim = InSimulator(
            [InNodeSpec(n.name, n.origin_host, n.realm, ranges=tuple(
                MsisdnRange.parse(f"{r.start}-{r.end}" if r.start else f"{r.prefix}*")
                for r in n.ranges)) for n in b.in_nodes],
            NodePeer("127.0.0.1", dport, b.node.origin_host, b.node.origin_realm),
            b.node.currency_numeric, b.node.currency_exponent, b.diameter.service_context_id,
            currency=b.node.currency, mqtt=MqttTarget("127.0.0.1", self.mqtt_port),
        )
        in_ports = await self.in_sim.start()
        stack.push_async_callback(self.in_sim.close)
        password = os.urandom(4).hex()
        self.smsc = FuzzSmsc("extrabalance", password)
        smsc_port = await self.smsc.start()
        stack.push_async_callback(self.smsc.close)

        db_path = self.workdir / "extrabalance.db"
        self.db_path = db_path
        profiles = self.workdir / "profiles.csv"
        profiles.write_text("msisdn,tenure_days,arpu_minor,language\n" + "".join(
            f"{m},400,5000,en\n" for m in DEBTORS), encoding="utf-8")
        import_profiles(db_path, profiles, progress=False)
        overrides = {
            "storage": {"path": str(db_path)},
            "diameter": {"listen_port": dport},
            "in_nodes": [{**n.model_dump(exclude_none=True),
                          "peers": [{"host": "127.0.0.1", "port": in_ports[n.name]}]}
                         for n in b.in_nodes],
            "smpp": {"binds": [{"host": "127.0.0.1", "port": smsc_port,
                                "system_id": "extrabalance", "password_env": SMPP_PASSWORD_ENV,
                                "submit_rate_max_per_s": 5000}] * self.cfg.smpp_binds},
            "mqtt": {"port": self.mqtt_port, "client_id": "extrabalance-fuzz"},
        }
        self.probe_dir = self.workdir / "probes"
        self.probe_dir.mkdir(exist_ok=True)
        self.node = NodeProcess(self.workdir, overrides,
                                {SMPP_PASSWORD_ENV: password, PROBE_DIR_ENV: str(self.probe_dir)},
                                self.cfg.node_log_level)
        self.pid = self.node.start()
        stack.callback(self._stop_node)
        await self._wait_node_ready()

    async def probe(self, timeout_s: float = 60.0) -> dict[str, Any] | None:
        """SIGUSR1 to the node child; its counters (None if it did not answer in time)."""
        assert self.node is not None and self.node.proc is not None
        async with self.probe_lock:  # signals do not queue: one probe at a time
            self.probes_sent += 1
            path = self.probe_dir / f"probe-{self.probes_sent}.json"
            self.node.proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if path.exists():
                    return dict(json.loads(path.read_text(encoding="utf-8")))
                await asyncio.sleep(0.1)
            return None

    async def probe_periodically(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            counters = await self.probe()
            if counters is not None:
                self.report.probes.append(counters)

    def _stop_node(self) -> None:
        if self.node is not None and self.node.alive:
            self.report.node_exit_code = self.node.stop()

    async def _wait_node_ready(self) -> None:
        assert self.smsc is not None and self.node is not None
        try:
            await self.in_sim.wait_connected(START_WAIT_S)
            await self.smsc.wait_bound(self.cfg.smpp_binds, START_WAIT_S)
        except TimeoutError:
            raise RuntimeError("node did not come up:\n" + self.node.stderr_tail()) from None

    async def dead_letter_watch(self, ready: asyncio.Event) -> None:
        """Counts dead letters; a persistent session, so a reconnect loses none."""
        import aiomqtt

        while True:
            try:
                await self._dead_letter_session(ready)
            except aiomqtt.MqttError:
                self.report.mqtt.extra["dead_letter_watch_reconnects"] += 1
                await asyncio.sleep(0.2)

    async def _dead_letter_session(self, ready: asyncio.Event) -> None:
        import aiomqtt

        topic = self.base.mqtt.dead_letter_topic
        async with aiomqtt.Client("127.0.0.1", self.mqtt_port, clean_session=False,
                                  identifier=f"eb-fuzz-dead-{os.getpid()}",
                                  logger=QUIET_MQTT_LOG) as client:
            no_nagle(client)
            await client.subscribe(topic, qos=1)
            ready.set()
            async for message in client.messages:
                if message.topic.value != topic:
                    continue
                if PROBE_B64 in bytes(message.payload):  # type: ignore[arg-type]
                    self.probe_dead_letters += 1
                else:
                    self.dead_letters += 1
                self.dead_letter_event.set()

    async def wait_mqtt_subscribed(self, client: Any) -> None:
        """Publish a probe payload until its dead letter shows the node's session is up."""
        topic = f"extrabalance/recharge/{self.in_a.name}"
        async with asyncio.timeout(START_WAIT_S):
            while self.probe_dead_letters == 0:
                self.dead_letter_event.clear()
                await client.publish(topic, PROBE, qos=1)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self.dead_letter_event.wait()

    async def seed_debts(self) -> None:
        """Each debtor borrows by SMS, the real way: deliver_sm → loan → IN credit."""
        assert self.smsc is not None
        bind = self.smsc.bound()[0]
        bind.send([(self.sframes.valid_sms(m, LOAN_TEXT), True, "seed") for m in DEBTORS])
        await bind.wait_idle(ANSWER_WAIT_S)
        async with asyncio.timeout(START_WAIT_S):
            while sum(1 for op in self.in_sim.applied() if op.action == "REFUND_ACCOUNT") \
                    < len(DEBTORS):
                await asyncio.sleep(0.05)

    # -- lanes ----------------------------------------------------------------------

    async def diameter_lane(self, quota: int, stats: LaneStats) -> None:
        started = time.monotonic()
        try:
            await self._diameter_lane(quota, stats)
        finally:
            stats.extra["lane_ms_max"] = max(stats.extra["lane_ms_max"],
                                             int((time.monotonic() - started) * 1000))

    async def _diameter_lane(self, quota: int, stats: LaneStats) -> None:
        """Pipelined: up to `diameter_window` answers outstanding, judged as they come."""
        from extrabalance.diameter import codec

        conn = await self._diameter_open(stats)
        sent = 0
        while sent < quota and self.time_left():
            if not await conn.wait_space(ANSWER_WAIT_S) or conn.closed.is_set():
                self._diameter_stalled(conn, stats)
                await conn.close()
                conn = await self._diameter_open(stats)
            n = min(self.cfg.diameter_batch, quota - sent)
            frames: list[tuple[bytes, bool, object]] = []
            for _ in range(n):
                f = self.dframes.pipe_frame()
                frames.append((f.data, f.expects_answer, f.mutation))
                stats.mutations[f.mutation] += 1
            self.check_ccrs += 1
            frames.append((codec.encode(self.dframes.ccr(check_ccr_msisdn(self.check_ccrs))),
                           True, "check"))
            conn.send(frames)
            sent += n
            stats.sent += n
        if not await conn.wait_idle(ANSWER_WAIT_S):
            self._diameter_stalled(conn, stats)
        await conn.close()

    def _diameter_stalled(self, conn: DiameterConn, stats: LaneStats) -> None:
        missing = Counter(str(tag) for tag in conn.pending.values())
        if conn.closed.is_set():
            stats.extra["unexpected_closes"] += 1
            stats.fail(f"node closed a sound connection; unanswered: {dict(missing)}")
        else:
            stats.fail(f"no answer within {ANSWER_WAIT_S} s for {dict(missing)}")
        stats.extra["missing_answers"] += sum(missing.values())
        conn.pending.clear()

    def _judge_diameter(self, answer: Any, tag: object, stats: LaneStats) -> None:
        code = answer.result_code
        stats.answers[str(code)] += 1
        if not answer.decodable:
            stats.fail(f"undecodable answer to {tag}")
            return
        if tag == "check":
            stats.extra["valid_checked"] += 1
            if code == 3004 and answer.error_bit:  # overloaded: the IN re-sends later
                stats.extra["valid_too_busy"] += 1
            elif code != 4012 or answer.granted:
                stats.fail(f"valid CCR answered {code} (granted={answer.granted})")
            return
        if code not in DIAMETER_ALLOWED_RESULTS:
            stats.fail(f"{tag}: result {code} not an allowed answer")
        elif answer.granted:
            stats.fail(f"{tag}: answer grants credit")
        elif code is not None and (3000 <= code < 4000) != answer.error_bit:
            stats.fail(f"{tag}: result {code} with E bit {answer.error_bit}")

    async def _diameter_open(self, stats: LaneStats) -> DiameterConn:
        conn = DiameterConn("127.0.0.1", self.diameter_port, self.in_a.origin_host,
                            self.in_a.realm)
        # A loaded node answers the CER behind thousands of queued requests: wait as
        # long as for any answer.
        for attempt in range(CER_ATTEMPTS_MAX):
            cea = await conn.open(cea_wait_s=ANSWER_WAIT_S)
            if cea is not None:
                break
            # No CEA in time: a finding (counted), but not one that should end the run.
            stats.fail(f"no CEA within {ANSWER_WAIT_S} s (attempt {attempt + 1})")
            await conn.close()
            conn = DiameterConn("127.0.0.1", self.diameter_port, self.in_a.origin_host,
                                self.in_a.realm)
        if cea is None or cea.result_code != 2001:
            raise RuntimeError(f"CER as an allowed peer refused: {cea}")
        stats.extra["connections"] += 1
        conn.on_answer = lambda tag, answer: self._judge_diameter(answer, tag, stats)
        conn.low_water = max(0, self.cfg.diameter_window - self.cfg.diameter_batch - 1)
        return conn

    async def diameter_kill_lane(self, quota: int, stats: LaneStats) -> None:
        """Connections that must be closed: fatal framing, traffic before CER, unknown peer."""
        r = random.Random(self.cfg.seed * 7 + 4)
        for _ in range(quota):
            if not self.time_left():
                return
            kind = r.choices(("after_cer", "before_cer", "unknown_peer"), (5, 3, 2))[0]
            conn = DiameterConn("127.0.0.1", self.diameter_port, self.in_a.origin_host,
                                self.in_a.realm)
            try:
                if kind == "unknown_peer":
                    cea = await conn.open(origin_host=f"rogue{r.randrange(999)}.example")
                    stats.answers[f"CEA {cea.result_code if cea else None}"] += 1
                    if cea is None or cea.result_code != 3010 or not cea.error_bit:
                        stats.fail(f"unknown peer got CEA {cea}")
                else:
                    await conn.open(do_cer=kind == "after_cer")
                    frame = (self.dframes.kill_frame() if kind == "after_cer" or r.random() < 0.5
                             else self.dframes.pipe_frame())
                    if frame.data[5:8] == (257).to_bytes(3, "big"):
                        # a mutation that became a valid CER would rightly open the
                        # connection: keep this lane about traffic before CER
                        frame = self.dframes.kill_frame()
                    stats.mutations[f"{kind}:{frame.mutation}"] += 1
                    assert conn.writer is not None
                    conn.writer.write(frame.data)
                stats.sent += 1
                # A well-framed answer before CER is discarded like any unmatched answer;
                # the node's capabilities-exchange timer then closes the connection.
                stray_answer = (kind == "before_cer" and len(frame.data) >= 20
                                and not frame.data[4] & 0x80 and frame.data[0] == 1)
                wait_s = CLOSE_WAIT_S + (CAPABILITIES_TIMEOUT_S if stray_answer else 0.0)
                if await conn.wait_closed(wait_s):
                    stats.answers["connection closed"] += 1
                else:
                    stats.answers["left open"] += 1
                    stats.fail(f"{kind}: connection left open after a fatal frame")
            finally:
                await conn.close()

    async def smpp_lane(self, quota: int, stats: LaneStats) -> None:
        assert self.smsc is not None
        smsc = self.smsc
        r = random.Random(self.cfg.seed * 7 + 5)
        sent = 0
        next_kill = self.cfg.smpp_kill_every
        binds_before = smsc.bind_attempts
        lane_started = time.monotonic()
        kills = 0
        while sent < quota and self.time_left():
            async with asyncio.timeout(START_WAIT_S):
                while not smsc.bound():
                    smsc.bind_changed.clear()
                    await smsc.bind_changed.wait()
            binds = smsc.bound()
            n = min(self.cfg.smpp_batch, quota - sent)
            jobs = []
            for bind in binds:
                frames: list[tuple[bytes, bool, object]] = []
                for _ in range(n // len(binds) or 1):
                    f = self.sframes.pipe_frame()
                    frames.append((f.data, f.expects_answer, f.mutation))
                    stats.mutations[f.mutation] += 1
                frames.append((self.sframes.valid_sms(CHECK_SMS_MSISDN, "HELP"), True, "check"))
                bind.send(frames)
                sent += len(frames) - 1
                stats.sent += len(frames) - 1
                jobs.append(bind)
            for bind in jobs:
                if not await bind.wait_idle(ANSWER_WAIT_S):
                    if bind.closed.is_set():
                        stats.extra["unexpected_unbinds"] += 1
                        stats.fail(f"bind lost during a sound batch: {dict(Counter(map(str, bind.pending.values())))}")
                    else:
                        stats.fail(f"no response within {ANSWER_WAIT_S} s: {len(bind.pending)}")
                    stats.extra["missing_responses"] += len(bind.pending)
                    bind.pending.clear()
                for text in bind.unexpected:
                    stats.fail(text)
                bind.unexpected.clear()
            if sent >= next_kill:
                next_kill += self.cfg.smpp_kill_every
                victim = r.choice(smsc.bound())
                frame = self.sframes.kill_frame()
                stats.mutations[frame.mutation] += 1
                victim.send([(frame.data, False, frame.mutation)])
                stats.sent += 1
                kills += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_WAIT_S):
                        await victim.closed.wait()
                if not victim.closed.is_set():
                    stats.fail("bind left open after command_length < 16")
        stats.answers.update(smsc.statuses)
        stats.extra["lane_ms"] = int((time.monotonic() - lane_started) * 1000)
        stats.extra["binds_killed_on_purpose"] = kills
        stats.extra["rebinds"] = smsc.bind_attempts - binds_before

    async def mqtt_lane(self, quota: int, stats: LaneStats) -> None:
        import aiomqtt

        from extrabalance.recharge.events import InvalidRecharge, parse_recharge

        topic = f"extrabalance/recharge/{self.in_a.name}"
        currency = self.base.node.currency
        expected_dead = 0
        window = asyncio.Semaphore(self.cfg.mqtt_inflight)
        tasks: set[asyncio.Task[None]] = set()
        valid_jobs: list[asyncio.Task[Any]] = []
        debtor = 0

        async def publish(client: Any, payload: bytes) -> None:
            try:
                # The broker is loaded too: a slow PUBACK is not the node's fault.
                await client.publish(topic, payload, qos=1, timeout=PUBLISH_WAIT_S)
            except aiomqtt.MqttError as exc:
                stats.fail(f"fuzzer's publish failed: {exc}")
            finally:
                window.release()

        async with aiomqtt.Client("127.0.0.1", self.mqtt_port,
                                  identifier=f"eb-fuzz-pub-{os.getpid()}",
                                  logger=QUIET_MQTT_LOG) as client:
            no_nagle(client)
            await self.wait_mqtt_subscribed(client)
            publish_started = time.monotonic()
            for i in range(quota):
                if not self.time_left():
                    break
                payload, kind = self.payloads.payload()
                stats.mutations[kind] += 1
                try:
                    parse_recharge(payload, expected_currency=currency)
                    stats.extra["accidentally_valid"] += 1
                except InvalidRecharge:
                    expected_dead += 1
                await window.acquire()
                task = asyncio.create_task(publish(client, payload))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                stats.sent += 1
                if i % self.cfg.mqtt_valid_every == 0:
                    msisdn = DEBTORS[debtor % len(DEBTORS)]
                    debtor += 1
                    valid_jobs.append(asyncio.create_task(self.in_sim.recharge(msisdn, RECHARGE_MINOR)))
            await asyncio.gather(*tasks)
            for event in await asyncio.gather(*valid_jobs):
                self.valid_event_ids.add(event.event_id)
        stats.extra["publish_ms"] = int((time.monotonic() - publish_started) * 1000)
        stats.extra["expected_dead_letters"] = expected_dead
        stats.extra["valid_recharges"] = len(valid_jobs)
        # The node dead-letters at its own pace: wait until it has caught up, for as
        # long as it makes progress (a stall of DRAIN_STALL_S is a finding).
        seen, last_progress = -1, time.monotonic()
        drain_started = time.monotonic()
        while (self.dead_letters < expected_dead
               and time.monotonic() - last_progress < DRAIN_STALL_S):
            if self.dead_letters != seen:
                seen, last_progress = self.dead_letters, time.monotonic()
            await asyncio.sleep(0.2)
        stats.extra["dead_letter_drain_ms"] = int((time.monotonic() - drain_started) * 1000)
        stats.answers["dead-lettered"] = self.dead_letters
        # The node counts a payload invalid when it reads it and dead-lettered when the
        # broker acknowledged the dead letter: ask until the two agree (a stall is a
        # finding, reported below).
        listener: dict[str, Any] = {}
        asked_until = time.monotonic() + DRAIN_STALL_S
        while True:
            counters = await self.probe()
            listener = counters["recharge_listener"] if counters else {}
            if (not listener or int(listener["dead_lettered"]) >= int(listener["invalid"])
                    or time.monotonic() > asked_until):
                break
            await asyncio.sleep(0.2)
        for key in ("received", "invalid", "dead_lettered", "handled", "acked",
                    "handler_failures", "reconnects", "redelivered"):
            stats.extra[f"node_{key}"] = int(listener.get(key, 0))
        # At least once: a message redelivered after a reconnect is dead-lettered again,
        # so more dead letters than invalid payloads is fine, fewer is not.
        if self.dead_letters < expected_dead:
            stats.fail(f"dead letters {self.dead_letters} < invalid payloads {expected_dead}")
        if listener and int(listener["dead_lettered"]) < int(listener["invalid"]):
            stats.fail(f"node: {listener['invalid']} invalid payloads, only "
                       f"{listener['dead_lettered']} dead-lettered")

    # -- after the run ----------------------------------------------------------------

    async def final_checks(self) -> None:
        """The well-behaved peers still get right answers after everything."""
        stats = self.report.diameter
        conn = await self._diameter_open(stats)
        conn.on_answer = None
        from extrabalance.diameter import codec

        ids = conn.send([(codec.encode(self.dframes.ccr(CHECK_CCR_MSISDN)), True, "check")])
        await conn.wait_idle(ANSWER_WAIT_S)
        answer = conn.answers.get(ids[0])
        self.report.checks["diameter_valid_after_run"] = (
            answer is not None and answer.result_code == 4012 and not answer.granted)
        await conn.close()
        assert self.smsc is not None
        before = self.smsc.submits[CHECK_SMS_MSISDN]
        bind = self.smsc.bound()[0]
        bind.send([(self.sframes.valid_sms(CHECK_SMS_MSISDN, "HELP"), True, "final")])
        await bind.wait_idle(ANSWER_WAIT_S)
        deadline = time.monotonic() + ANSWER_WAIT_S
        while self.smsc.submits[CHECK_SMS_MSISDN] == before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.report.checks["smpp_valid_after_run"] = self.smsc.submits[CHECK_SMS_MSISDN] > before
        # Every valid recharge settled: wait until the IN has seen the debits settle.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._recoveries_settled():
                break
            await asyncio.sleep(0.2)

    def _recoveries_settled(self) -> bool:
        with contextlib.closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)) as c:
            open_ = c.execute("SELECT COUNT(*) FROM recoveries WHERE state NOT IN ('DONE','FAILED')"
                              ).fetchone()[0]
        return int(open_) == 0

    def ledger_checks(self) -> None:
        """After the node stopped: money moved only where valid input asked for it."""
        ops = self.in_sim.applied()
        credited = [op for op in ops if op.action == "REFUND_ACCOUNT"]
        debited = -sum(op.moved_minor for op in ops if op.action == "DIRECT_DEBITING")
        with contextlib.closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)) as c:
            loans = c.execute("SELECT msisdn, state FROM loans").fetchall()
            journal_sum = c.execute("SELECT COALESCE(SUM(amount_minor),0) FROM journal").fetchone()[0]
            recovered = c.execute("SELECT COALESCE(SUM(recovered_minor),0) FROM recoveries "
                                  "WHERE state='DONE'").fetchone()[0]
            events = {row[0] for row in c.execute("SELECT event_id FROM recoveries")}
            idem = c.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0]
        foreign = events - self.valid_event_ids
        self.report.ledger.update({
            "loans": len(loans), "loans_expected": len(DEBTORS),
            "in_credits": len(credited), "journal_sum_minor": int(journal_sum),
            "recovered_minor": int(recovered), "in_debited_minor": int(debited),
            "recoveries": len(events), "recoveries_not_from_valid_recharges": len(foreign),
            "valid_recharges": len(self.valid_event_ids), "idempotency_rows": int(idem),
        })
        self.report.checks["no_money_moved_by_garbage"] = (
            len(loans) == len(DEBTORS) and {m for m, _ in loans} == set(DEBTORS)
            and len(credited) == len(DEBTORS) and not foreign)
        self.report.checks["journal_balanced"] = int(journal_sum) == 0
        self.report.checks["ledger_matches_in"] = int(recovered) == int(debited)
        self.report.checks["valid_recharges_paid_back"] = int(recovered) > 0


async def run_fuzz(cfg: FuzzConfig, workdir: Path | None = None) -> FuzzReport:
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="extrabalance-fuzz-")) if workdir is None else workdir
    if cfg.keep:
        print(f"work dir: {work}", file=sys.stderr)
    run = FuzzRun(cfg, work)
    report = run.report
    try:
        async with contextlib.AsyncExitStack() as stack:
            await run.setup(stack)
            ready = asyncio.Event()
            watcher = asyncio.create_task(run.dead_letter_watch(ready))
            stack.callback(watcher.cancel)
            await asyncio.wait_for(ready.wait(), START_WAIT_S)
            await run.seed_debts()
            assert run.node is not None
            report.rss_start_kib = rss_kib(run.pid) or 0
            sampler = RssSampler(run.pid).start()
            stack.callback(sampler.stop)
            if cfg.probe_every_s:
                prober = asyncio.create_task(run.probe_periodically(cfg.probe_every_s))
                stack.callback(prober.cancel)
            d_quota = int(cfg.frames * cfg.diameter_share)
            s_quota = int(cfg.frames * cfg.smpp_share)
            m_quota = cfg.frames - d_quota - s_quota
            kill_quota = d_quota // cfg.kill_every
            pipe_quota = d_quota - kill_quota
            per_conn = pipe_quota // cfg.diameter_connections
            started = time.monotonic()
            if cfg.seconds is not None:
                run.deadline = started + cfg.seconds
            d, k = report.diameter, LaneStats()
            lanes = [run.diameter_lane(per_conn + (pipe_quota % cfg.diameter_connections
                                                   if i == 0 else 0), d)
                     for i in range(cfg.diameter_connections)]
            kill_workers = 4
            lanes += [run.diameter_kill_lane(kill_quota // kill_workers
                                             + (kill_quota % kill_workers if i == 0 else 0), k)
                      for i in range(kill_workers)]
            lanes += [run.smpp_lane(s_quota, report.smpp), run.mqtt_lane(m_quota, report.mqtt)]

            async def watch_node() -> None:
                while True:
                    await asyncio.sleep(0.2)
                    if not run.node.alive:  # type: ignore[union-attr]
                        report.node_crashed = True
                        raise RuntimeError("the node process exited during the fuzz run")

            guard = asyncio.create_task(watch_node())
            try:
                work_all = asyncio.gather(*lanes)
                done, _ = await asyncio.wait({work_all, guard}, return_when=asyncio.FIRST_COMPLETED)
                if guard in done:
                    work_all.cancel()
                    with contextlib.suppress(BaseException):
                        await work_all
                else:
                    work_all.result()
            finally:
                guard.cancel()
            report.seconds = time.monotonic() - started
            # fold the kill lane into the Diameter figures
            d.sent += k.sent
            d.answers.update(k.answers)
            d.mutations.update(k.mutations)
            d.failures += k.failures
            d.extra["fatal_frame_connections"] = k.sent
            d.extra["failures"] += k.extra["failures"]
            await run.final_checks()
            report.rss_end_kib = rss_kib(run.pid) or 0
            sampler.stop()
            report.rss_peak_kib = max(sampler.peak_kib, report.rss_end_kib)
            samples = sampler.samples
            report.rss_curve_mib = [round(samples[min(len(samples) - 1, len(samples) * i // 10)][1]
                                          / 1024, 1) for i in range(1, 11)] if samples else []
            report.node_exit_code = run.node.stop()
            at_stop = run.probe_dir / "probe-0.json"
            if at_stop.exists():
                report.node_counters_at_stop = json.loads(at_stop.read_text(encoding="utf-8"))
            run.ledger_checks()
    finally:
        if run.node is not None:
            report.stderr_tail = run.node.stderr_tail() if not report.ok else ""
            if run.node.alive:
                run.node.stop()
        if own_dir and not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)
    growth_mib = (report.rss_peak_kib - report.rss_start_kib) / 1024
    report.checks.update({
        "node_never_crashed": not report.node_crashed,
        "node_stopped_cleanly": report.node_exit_code == 0,
        "rss_growth_bounded": growth_mib <= cfg.rss_growth_max_mib,
        "diameter_answers_as_rfc": report.diameter.extra["failures"] == 0,
        "diameter_valid_ccrs_answered_4012": (report.diameter.extra["valid_checked"]
                                              > report.diameter.extra["valid_too_busy"]),
        "smpp_responses_and_binds": report.smpp.extra["failures"] == 0,
        "mqtt_dead_letters": report.mqtt.extra["failures"] == 0,
    })
    return report


# --- output ------------------------------------------------------------------------------


def format_report(r: FuzzReport) -> str:
    rows: list[tuple[str, str]] = []
    rate = r.frames / r.seconds if r.seconds else 0.0
    rows.append(("frames sent", f"{r.frames:,} in {r.seconds:,.1f} s ({rate:,.0f}/s)"))
    for name, lane in (("diameter", r.diameter), ("smpp", r.smpp), ("mqtt", r.mqtt)):
        rows.append((f"{name} frames", f"{lane.sent:,}"))
        top = ", ".join(f"{k}: {v:,}" for k, v in lane.answers.most_common(14))
        rows.append((f"{name} answers", top))
        extra = ", ".join(f"{k}: {v:,}" for k, v in sorted(lane.extra.items()))
        if extra:
            rows.append((f"{name} notes", extra))
    rows.append(("crashes", "1" if r.node_crashed else "0"))
    rows.append(("node exit code", str(r.node_exit_code)))
    rss = (f"start {r.rss_start_kib / 1024:,.1f}, peak {r.rss_peak_kib / 1024:,.1f}, "
           f"end {r.rss_end_kib / 1024:,.1f} (bound: growth <= "
           f"{r.config['rss_growth_max_mib']} MiB)")
    rows.append(("node RSS (MiB)", rss))
    rows.append(("node RSS curve (MiB)", " ".join(str(v) for v in r.rss_curve_mib)))
    at_stop = r.node_counters_at_stop
    for name in ("gy", "recharge_listener", "smpp_channel"):
        if isinstance(at_stop.get(name), dict):
            rows.append((f"node {name} (at stop)",
                         ", ".join(f"{k}: {v}" for k, v in at_stop[name].items())))
    rows.append(("ledger", ", ".join(f"{k}: {v}" for k, v in r.ledger.items())))
    for name, ok in r.checks.items():
        rows.append((f"check {name}", "ok" if ok else "FAILED"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for lane_name, lane in (("diameter", r.diameter), ("smpp", r.smpp), ("mqtt", r.mqtt)):
        for text in lane.failures[:10]:
            lines.append(f"  {lane_name} failure: {text}")
    if r.stderr_tail:
        lines.append("node stderr (tail):\n" + r.stderr_tail)
    return "\n".join(lines)


def report_json(r: FuzzReport) -> dict[str, Any]:
    out = asdict(r)
    out["frames"] = r.frames
    out["ok"] = r.ok
    return out


def run_cli(argv: list[str]) -> int:
    p = Parser(prog="extrabalance fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work dir (ledger, node log)")
    p.add_argument("--probe-every", type=float, default=None, metavar="S",
                   help=f"node counters every S seconds into the work dir's probes/ (with "
                        f"{TRACEMALLOC_ENV}=<frames> set: allocation dumps too); use --keep")
    args = p.parse_args(argv)
    cfg = FuzzConfig(frames=args.frames, seconds=args.seconds, seed=args.seed, keep=args.keep,
                     probe_every_s=args.probe_every)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    report = asyncio.run(run_fuzz(cfg))
    print(json.dumps(report_json(report), default=str) if args.json else format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "node-child":
        sys.exit(node_child(sys.argv[2]))
    sys.exit(run_cli(sys.argv[1:]))
