"""A deliberately small HTTP/1.1 server for the admin API, on asyncio streams.

What this file owns: reading one request from a connection within bounds, parsing it
(pure functions, no sockets: `parse_head`), writing one response, closing. It knows
nothing about routes, tokens or the node.

Rules it keeps, so a broken or hostile client cannot hurt the node:
- one request per connection (`Connection: close` on every response): no keep-alive
  state to get wrong, and the admin API is low-volume;
- the request head is at most `HEAD_BYTES_MAX`, the body at most `BODY_BYTES_MAX`,
  and only `Content-Length` bodies are accepted (no chunked uploads);
- the whole request must arrive within `REQUEST_TIMEOUT_S`; a slow client is dropped;
- at most `CONNECTIONS_MAX` connections at once; one more gets 503 and is closed;
- a handler that raises gives that client a 500; other connections never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import structlog

log = structlog.get_logger(__name__)

HEAD_BYTES_MAX = 16 * 1024  # request line + headers
BODY_BYTES_MAX = 64 * 1024  # JSON bodies of the admin API are tiny
HEADERS_MAX = 64
REQUEST_TIMEOUT_S = 5.0  # whole request (head and body) must arrive within this
WRITE_TIMEOUT_S = 10.0  # a client that does not read its answer is dropped
CONNECTIONS_MAX = 64

REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type",
    422: "Unprocessable Content", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """An error answer: status and a message that goes to the client as JSON."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str  # percent-decoded path, without the query
    query: dict[str, list[str]]
    version: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps the last value


@dataclass(frozen=True, slots=True)
class Request:
    head: RequestHead
    body: bytes
    peer: str

    @property
    def method(self) -> str:
        return self.head.method

    @property
    def path(self) -> str:
        return self.head.path

    def header(self, name: str) -> str | None:
        return self.head.headers.get(name.lower())

    def json(self) -> Any:
        """The body as JSON; an empty body is `{}`. Malformed JSON is a 400."""
        if not self.body.strip():
            return {}
        ctype = (self.header("content-type") or "application/json").split(";")[0].strip()
        if ctype != "application/json":
            raise HttpError(415, f"expected Content-Type application/json, got {ctype!r}")
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(400, f"malformed JSON body: {exc}") from None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, sort_keys=True, default=str).encode("utf-8") + b"\n"
    return Response(status, body, "application/json", dict(headers or {}))


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response(status, {"error": message}, headers)


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def parse_head(raw: bytes) -> RequestHead:
    """Parse a request line and headers (without the final blank line). Pure."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not method or not set(method) <= _TOKEN_CHARS:
        raise HttpError(400, "malformed method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, f"unsupported version {version!r}")
    if not target.startswith("/"):
        raise HttpError(400, "request target must be an absolute path")
    if len(lines) - 1 > HEADERS_MAX:
        raise HttpError(431, f"more than {HEADERS_MAX} headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise HttpError(400, "malformed header line")
        headers[name.lower()] = value.strip(" \t")
    split = urlsplit(target)
    return RequestHead(method, unquote(split.path), parse_qs(split.query), version, headers)


def render_response(response: Response) -> bytes:
    """Status line, headers and body of a `Connection: close` response. Pure."""
    reason = REASONS.get(response.status, "Status")
    headers = {
        "Content-Type": response.content_type,
        "Content-Length": str(len(response.body)),
        "Connection": "close",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        **response.headers,
    }
    head = f"HTTP/1.1 {response.status} {reason}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + response.body


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """`await HttpServer(handler).start(host, port)` → bound port; `await close()`."""

    def __init__(self, handler: Handler, *, connections_max: int = CONNECTIONS_MAX,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.handler = handler
        self.connections_max = connections_max
        self.request_timeout_s = request_timeout_s
        self._server: asyncio.Server | None = None
        self._active: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(
            self._on_connection, host, port, limit=HEAD_BYTES_MAX)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        for task in list(self._active):
            task.cancel()
        self._server = None

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        try:
            if len(self._active) >= self.connections_max:
                await self._send(writer, error_response(503, "too many admin connections"))
                return
            self._active.add(task)
            try:
                response = await self._serve_one(reader, peer)
            except HttpError as exc:
                response = error_response(exc.status, exc.message, exc.headers)
            await self._send(writer, response)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # never let one client take the server down
            log.exception("admin_http_connection_error", peer=peer)
        finally:
            self._active.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve_one(self, reader: asyncio.StreamReader, peer: str) -> Response:
        try:
            async with asyncio.timeout(self.request_timeout_s):
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    raise HttpError(431, f"request head larger than {HEAD_BYTES_MAX} bytes") from None
                except asyncio.IncompleteReadError:
                    raise ConnectionError("client closed before the end of the head") from None
                head = parse_head(raw[:-4])
                if "transfer-encoding" in head.headers:
                    raise HttpError(501, "Transfer-Encoding is not supported; send Content-Length")
                length_text = head.headers.get("content-length", "0")
                if not length_text.isdigit():
                    raise HttpError(400, "malformed Content-Length")
                length = int(length_text)
                if length > BODY_BYTES_MAX:
                    raise HttpError(413, f"body larger than {BODY_BYTES_MAX} bytes")
                try:
                    body = await reader.readexactly(length) if length else b""
                except asyncio.IncompleteReadError:
                    raise HttpError(400, "body shorter than Content-Length") from None
        except TimeoutError:
            raise HttpError(408, f"request not complete within {self.request_timeout_s} s") from None
        request = Request(head, body, peer)
        try:
            return await self.handler(request)
        except HttpError:
            raise
        except Exception:
            log.exception("admin_http_handler_error", method=head.method, path=head.path)
            return error_response(500, "internal error; see the node's log")

    async def _send(self, writer: asyncio.StreamWriter, response: Response) -> None:
        writer.write(render_response(response))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
