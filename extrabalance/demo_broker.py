"""A small in-process MQTT 3.1.1 broker — FOR THE DEMO ONLY.

`extrabalance demo` uses Mosquitto when it is installed. On a machine without it,
this broker lets the demo run anyway: QoS 0/1, `+`/`#` wildcards, persistent sessions
(clean session off) kept in memory, redelivery of unacknowledged messages on
reconnect. It keeps nothing on disk, has no authentication and no retained messages:
never point a node in production at it.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from extrabalance.recharge.events import topic_matches

QUEUE_MAX = 100_000  # messages held per offline persistent session
PACKET_MAX = 1 << 20


def _encode_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _encode_length(len(body)) + body


def _string(data: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("!H", data, pos)
    return data[pos + 2 : pos + 2 + n].decode("utf-8"), pos + 2 + n


@dataclass
class _Session:
    client_id: str
    persistent: bool
    subscriptions: dict[str, int] = field(default_factory=dict)
    inflight: OrderedDict[int, tuple[str, bytes]] = field(default_factory=OrderedDict)
    queued: list[tuple[str, bytes]] = field(default_factory=list)
    writer: asyncio.StreamWriter | None = None
    ids: itertools.cycle[int] = field(default_factory=lambda: itertools.cycle(range(1, 65536)))


class DemoBroker:
    def __init__(self) -> None:
        self._sessions: dict[str, _Session] = {}
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for session in self._sessions.values():
                if session.writer is not None:
                    session.writer.close()
            await self._server.wait_closed()

    def _send(self, session: _Session, topic: str, payload: bytes, qos: int, dup: bool = False) -> None:
        if session.writer is None:
            if session.persistent and qos and len(session.queued) < QUEUE_MAX:
                session.queued.append((topic, payload))
            return
        body = struct.pack("!H", len(topic.encode())) + topic.encode()
        first = 0x30
        if qos:
            pid = next(session.ids)
            while pid in session.inflight:
                pid = next(session.ids)
            session.inflight[pid] = (topic, payload)
            body += struct.pack("!H", pid)
            first |= 0x02 | (0x08 if dup else 0)
        session.writer.write(_packet(first, body + payload))

    def _route(self, topic: str, payload: bytes, qos: int) -> None:
        for session in self._sessions.values():
            granted = [q for pat, q in session.subscriptions.items() if topic_matches(pat, topic)]
            if granted:
                self._send(session, topic, payload, min(qos, max(granted)))

    async def _read_packet(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        first = (await reader.readexactly(1))[0]
        length, shift = 0, 0
        for _ in range(4):
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if length > PACKET_MAX:
            raise ValueError("packet too large")
        return first, await reader.readexactly(length)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session: _Session | None = None
        try:
            first, body = await self._read_packet(reader)
            if first >> 4 != 1:
                return
            _, pos = _string(body, 0)
            flags = body[pos + 1]
            client_id, pos = _string(body, pos + 4)
            clean = bool(flags & 0x02)
            existing = self._sessions.get(client_id)
            if existing is not None and existing.writer is not None:
                existing.writer.close()
            if clean or existing is None:
                session = _Session(client_id, persistent=not clean)
            else:
                session = existing
            present = 1 if (existing is not None and not clean) else 0
            self._sessions[client_id] = session
            session.writer = writer
            writer.write(_packet(0x20, bytes([present, 0])))
            for topic, payload in list(session.inflight.values()):
                session.inflight.clear()
                self._send(session, topic, payload, 1, dup=True)
            queued, session.queued = session.queued, []
            for topic, payload in queued:
                self._send(session, topic, payload, 1)
            while True:
                first, body = await self._read_packet(reader)
                kind = first >> 4
                if kind == 3:  # PUBLISH
                    qos = (first >> 1) & 0x03
                    topic, pos = _string(body, 0)
                    if qos:
                        (pid,) = struct.unpack_from("!H", body, pos)
                        pos += 2
                        writer.write(_packet(0x40, struct.pack("!H", pid)))
                    self._route(topic, body[pos:], qos)
                elif kind == 4:  # PUBACK
                    session.inflight.pop(struct.unpack_from("!H", body, 0)[0], None)
                elif kind == 8:  # SUBSCRIBE
                    (pid,) = struct.unpack_from("!H", body, 0)
                    pos, granted = 2, bytearray()
                    while pos < len(body):
                        pattern, pos = _string(body, pos)
                        qos = min(body[pos], 1)
                        pos += 1
                        session.subscriptions[pattern] = qos
                        granted.append(qos)
                    writer.write(_packet(0x90, struct.pack("!H", pid) + bytes(granted)))
                elif kind == 10:  # UNSUBSCRIBE
                    (pid,) = struct.unpack_from("!H", body, 0)
                    pos = 2
                    while pos < len(body):
                        pattern, pos = _string(body, pos)
                        session.subscriptions.pop(pattern, None)
                    writer.write(_packet(0xB0, struct.pack("!H", pid)))
                elif kind == 12:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, struct.error, UnicodeDecodeError):
            pass
        finally:
            if session is not None and session.writer is writer:
                session.writer = None
                if not session.persistent:
                    self._sessions.pop(session.client_id, None)
            writer.close()
