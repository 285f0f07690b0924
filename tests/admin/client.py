"""A raw asyncio HTTP/1.1 client for the admin API tests (no client library, so the
tests also see exactly what goes over the wire)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_reply(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(status, headers, body)


async def raw_call(port: int, data: bytes, timeout_s: float = 10.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


async def call(port: int, method: str, path: str, *, token: str | None = None,
               body: Any = None, raw_body: bytes | None = None,
               headers: dict[str, str] | None = None) -> Reply:
    data = raw_body if raw_body is not None else (
        json.dumps(body).encode() if body is not None else b"")
    hdrs = {"Host": "127.0.0.1", "Content-Length": str(len(data)), **(headers or {})}
    if data and "Content-Type" not in hdrs:
        hdrs["Content-Type"] = "application/json"
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    return parse_reply(await raw_call(port, head.encode() + b"\r\n" + data))
