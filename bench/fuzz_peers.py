"""The fuzzer's network ends: a Diameter IN peer, an SMSC the node binds to, RSS sampling.

These are deliberately small raw-socket peers rather than the project's own stacks:
they must be able to put any byte on the wire, keep pipelining whatever the node
answers, and tell a clean close from a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from extrabalance.diameter import codec
from extrabalance.diameter.codec import avp
from extrabalance.diameter.constants import (
    AVP_AUTH_APPLICATION_ID,
    AVP_HOST_IP_ADDRESS,
    AVP_ORIGIN_HOST,
    AVP_ORIGIN_REALM,
    AVP_PRODUCT_NAME,
    AVP_RESULT_CODE,
    AVP_VENDOR_ID,
)
from extrabalance.smpp import pdu as smpp

CLOSE_WAIT_S = 5.0  # how long a connection given a fatal frame may take to be closed
READ_CHUNK = 1 << 16


# --- RSS ---------------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    """Samples a process's VmRSS from a thread (the event loop may be busy)."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            value = rss_kib(self.pid)
            if value is not None:
                self.samples.append((time.monotonic() - t0, value))
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    @property
    def peak_kib(self) -> int:
        return max((v for _, v in self.samples), default=0)


async def wait_either(a: asyncio.Event, b: asyncio.Event, timeout_s: float) -> None:
    """Until either event is set, or the timeout; leaves no task behind."""
    waiters = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


# --- Diameter ----------------------------------------------------------------------------


def cer(origin_host: str, origin_realm: str, hbh: int = 1) -> bytes:
    return codec.encode(codec.request(257, 0, [
        avp(AVP_ORIGIN_HOST, origin_host), avp(AVP_ORIGIN_REALM, origin_realm),
        avp(AVP_HOST_IP_ADDRESS, ipaddress.ip_address("127.0.0.1")),
        avp(AVP_VENDOR_ID, 0), avp(AVP_PRODUCT_NAME, "eb-fuzz"),
        avp(AVP_AUTH_APPLICATION_ID, 4),
    ], proxiable=False, hop_by_hop_id=hbh, end_to_end_id=hbh))


@dataclass
class Answer:
    result_code: int | None
    error_bit: bool
    command_code: int
    granted: bool  # a Granted-Service-Unit came back
    decodable: bool = True


def read_answer(frame: bytes) -> Answer:
    flags, command = frame[4], int.from_bytes(frame[5:8], "big")
    try:
        msg = codec.decode(frame)
    except Exception:  # noqa: BLE001 - the node sent something we cannot read: a finding
        return Answer(None, bool(flags & codec.FLAG_ERROR), command, False, decodable=False)
    code = msg.get(AVP_RESULT_CODE)
    return Answer(code if isinstance(code, int) else None, bool(flags & codec.FLAG_ERROR),
                  command, msg.first(431) is not None)


class DiameterConn:
    """One TCP connection to the node, as an IN peer, with pipelined requests.

    Requests are matched to answers by hop-by-hop id; the node's own requests
    (DWR) are answered so the connection stays healthy however long the run is.
    """

    def __init__(self, host: str, port: int, origin_host: str, origin_realm: str) -> None:
        self.host, self.port = host, port
        self.origin_host, self.origin_realm = origin_host, origin_realm
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, object] = {}
        self.answers: dict[int, Answer] = {}
        # Set: answers go to on_answer(tag, answer) as they arrive instead of `answers`.
        self.on_answer: Callable[[object, Answer], None] | None = None
        self.low_water = 0
        self.space = asyncio.Event()  # set while len(pending) <= low_water
        self.idle = asyncio.Event()
        self.closed = asyncio.Event()
        self._hbh = 0x1000
        self._reader_task: asyncio.Task[None] | None = None
        self.cea: Answer | None = None

    def next_hbh(self) -> int:
        self._hbh = (self._hbh + 1) & 0xFFFFFFFF or 1
        return self._hbh

    async def open(self, *, do_cer: bool = True, origin_host: str | None = None,
                   cea_wait_s: float = CLOSE_WAIT_S) -> Answer | None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self._reader_task = asyncio.create_task(self._read())
        if not do_cer:
            return None
        hbh = self.next_hbh()
        self.pending[hbh] = "CER"
        self.idle.clear()
        self.writer.write(cer(origin_host or self.origin_host, self.origin_realm, hbh))
        await self.wait_idle(cea_wait_s)
        self.cea = self.answers.pop(hbh, None)
        return self.cea

    def send(self, frames: list[tuple[bytes, bool, object]]) -> list[int]:
        """Write frames (bytes, answer expected, tag) with fresh hop-by-hop ids."""
        assert self.writer is not None
        out = []
        ids = []
        for data, expected, tag in frames:
            hbh = self.next_hbh()
            out.append(data[:12] + hbh.to_bytes(4, "big") + data[16:])
            if expected:
                self.pending[hbh] = tag
            ids.append(hbh)
        if self.pending:
            self.idle.clear()
        if len(self.pending) > self.low_water:
            self.space.clear()
        self.writer.write(b"".join(out))
        return ids

    async def wait_space(self, timeout_s: float) -> bool:
        """Until at most low_water answers are outstanding (False: timeout or closed)."""
        if len(self.pending) <= self.low_water:
            return True
        await wait_either(self.space, self.closed, timeout_s)
        return len(self.pending) <= self.low_water

    async def wait_idle(self, timeout_s: float) -> bool:
        if not self.pending:
            return True
        await wait_either(self.idle, self.closed, timeout_s)
        return not self.pending

    async def _read(self) -> None:
        framer = codec.Framer()
        assert self.reader is not None and self.writer is not None
        try:
            while True:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                for frame in framer.feed(data):
                    flags = frame[4]
                    hbh = int.from_bytes(frame[12:16], "big")
                    if flags & codec.FLAG_REQUEST:
                        self._answer_node_request(frame)
                        continue
                    tag = self.pending.pop(hbh, None)
                    if tag is not None:
                        if self.on_answer is not None:
                            self.on_answer(tag, read_answer(frame))
                        else:
                            self.answers[hbh] = read_answer(frame)
                        if len(self.pending) <= self.low_water:
                            self.space.set()
                        if not self.pending:
                            self.idle.set()
        except (ConnectionError, OSError, codec.FrameError):
            pass
        finally:
            self.closed.set()

    def _answer_node_request(self, frame: bytes) -> None:
        assert self.writer is not None
        msg = codec.decode(frame)
        if msg.command_code in (280, 282):  # DWR / DPR
            self.writer.write(codec.encode(codec.answer(msg, [
                avp(AVP_RESULT_CODE, 2001), avp(AVP_ORIGIN_HOST, self.origin_host),
                avp(AVP_ORIGIN_REALM, self.origin_realm)])))

    async def wait_closed(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.closed.wait()
        return self.closed.is_set()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task


# --- SMPP: the fuzzer plays the SMSC -----------------------------------------------------


@dataclass
class SmscBind:
    """One bind the node opened to us."""

    writer: asyncio.StreamWriter
    system_id: str
    pending: dict[int, object] = field(default_factory=dict)
    responses: Counter[str] = field(default_factory=Counter)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    seq: int = 0
    unexpected: list[str] = field(default_factory=list)

    def next_seq(self) -> int:
        self.seq = self.seq % 0x7FFFFFFF + 1
        return self.seq

    def send(self, frames: list[tuple[bytes, bool, object]]) -> None:
        out = []
        for data, expected, tag in frames:
            seq = self.next_seq()
            out.append(data[:12] + seq.to_bytes(4, "big") + data[16:])
            if expected:
                self.pending[seq] = tag
        if self.pending:
            self.idle.clear()
        self.writer.write(b"".join(out))

    async def wait_idle(self, timeout_s: float) -> bool:
        if not self.pending:
            return True
        await wait_either(self.idle, self.closed, timeout_s)
        return not self.pending


class FuzzSmsc:
    """Accepts the node's bind_transceiver (checking the credentials), answers its
    submit_sm and enquire_link, and lets the fuzzer send it anything."""

    def __init__(self, system_id: str, password: str, *,
                 on_submit: Callable[[smpp.SubmitSm], None] | None = None) -> None:
        self.system_id = system_id
        self.password = password
        self.on_submit = on_submit
        self.binds: list[SmscBind] = []
        self.bind_attempts = 0
        self.bind_refusals = 0
        self.bind_changed = asyncio.Event()
        self.submits: Counter[str] = Counter()  # by destination address
        self.statuses: Counter[str] = Counter()  # responses to what the fuzzer sent
        self._server: asyncio.base_events.Server | None = None
        self._message_id = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for b in list(self.binds):
            b.writer.close()

    def bound(self) -> list[SmscBind]:
        return [b for b in self.binds if not b.closed.is_set()]

    async def wait_bound(self, count: int, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.bound()) < count:
                self.bind_changed.clear()
                await self.bind_changed.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = smpp.Framer()
        bind: SmscBind | None = None
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                for item in framer.feed(data):
                    if isinstance(item, smpp.PduDecodeError):
                        continue
                    try:
                        pdu = smpp.decode(item)
                    except smpp.PduDecodeError as exc:
                        if bind is not None:
                            bind.unexpected.append(f"undecodable PDU from the node: {exc}")
                        continue
                    bind = self._on_pdu(pdu, item, writer, bind)
        except (ConnectionError, OSError):
            pass
        finally:
            if bind is not None:
                bind.closed.set()
                bind.idle.set()
            self.bind_changed.set()
            writer.close()

    def _on_pdu(self, pdu: smpp.Pdu, raw: bytes, writer: asyncio.StreamWriter,
                bind: SmscBind | None) -> SmscBind | None:
        cid = pdu.command_id
        if isinstance(pdu, smpp.BindTransceiver):
            self.bind_attempts += 1
            ok = pdu.system_id == self.system_id and pdu.password == self.password
            status = 0 if ok else (smpp.Status.ESME_RINVSYSID if pdu.system_id != self.system_id
                                   else smpp.Status.ESME_RINVPASWD)
            writer.write(smpp.encode(smpp.BindTransceiverResp(
                command_status=int(status), sequence_number=pdu.sequence_number,
                system_id="EBFUZZ")))
            if not ok:
                self.bind_refusals += 1
                return None
            bind = SmscBind(writer, pdu.system_id)
            bind.idle.set()
            self.binds.append(bind)
            self.bind_changed.set()
            return bind
        if isinstance(pdu, smpp.SubmitSm):
            self._message_id += 1
            self.submits[pdu.destination_addr] += 1
            if self.on_submit is not None:
                self.on_submit(pdu)
            writer.write(smpp.encode(smpp.SubmitSmResp(
                sequence_number=pdu.sequence_number, message_id=f"m{self._message_id}")))
            return bind
        if cid == smpp.CommandId.ENQUIRE_LINK or cid == smpp.CommandId.UNBIND:
            writer.write(smpp.encode(smpp.make_response(pdu)))
            return bind
        if cid & 0x8000_0000:  # a response to something we sent
            if bind is not None:
                tag = bind.pending.pop(pdu.sequence_number, None)
                if tag is not None:
                    name = smpp.status_name(pdu.command_status)
                    kind = "generic_nack" if cid == smpp.CommandId.GENERIC_NACK else "resp"
                    self.statuses[f"{kind} {name}"] += 1
                    bind.responses[str(tag)] += 1
                    if not bind.pending:
                        bind.idle.set()
            return bind
        if bind is not None:
            bind.unexpected.append(f"unexpected request from the node: {type(pdu).__name__}")
        writer.write(smpp.encode(smpp.make_response(pdu, smpp.Status.ESME_RINVCMDID)))
        return bind


def smpp_header(data: bytes) -> tuple[int, int, int, int]:
    return struct.unpack_from(">IIII", data)  # type: ignore[return-value]
