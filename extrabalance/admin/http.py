"""The admin API's HTTP transport, on aiohttp's low-level server.

What this file owns: admitting a connection, reading one request from it within
bounds and time, handing it to the router (`Handler`), writing one response, closing.
HTTP/1.1 parsing is aiohttp's (llhttp); this file knows nothing about routes, tokens
or the node.

Rules it keeps, so a broken or hostile client cannot hurt the node:
- one request per connection (`Connection: close` on every response): no keep-alive
  state to get wrong, and the admin API is low-volume;
- a request line or header line is at most `LINE_BYTES_MAX` (431 beyond), at most
  `HEADERS_MAX` headers, a body at most `BODY_BYTES_MAX` (413, not read), only
  `Content-Length` bodies (501 for `Transfer-Encoding`), and a repeated
  `Content-Length`, `Transfer-Encoding`, `Authorization`, `Content-Type` or `Host`
  header is a 400 (two readers of one request must never disagree on it);
- JSON bodies nest at most `JSON_DEPTH_MAX` deep and carry numbers of at most
  `JSON_NUMBER_CHARS_MAX` characters: deeper or longer is a 400, never a 500;
- the whole request must arrive within `REQUEST_TIMEOUT_S` (408 after), and a
  connection lives at most `CONNECTION_LIFETIME_MAX_S`;
- connections are admitted by `Admission` (see there): at most `CONNECTIONS_MAX` at
  once and `PER_CLIENT_MAX` per client address; a newcomer takes the place of the
  oldest connection that has not yet sent a whole request head, so slow or idle
  sockets cannot keep `/healthz` out; when every slot is busy serving, a few
  reserved slots (`HEALTH_RESERVE`) still answer the health paths;
- a handler that raises gives that client a 500; other connections never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import structlog
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

log = structlog.get_logger(__name__)

LINE_BYTES_MAX = 8 * 1024  # request line, and each header line
HEAD_BYTES_MAX = LINE_BYTES_MAX  # kept for callers: the longest line the head may hold
BODY_BYTES_MAX = 64 * 1024  # JSON bodies of the admin API are tiny
HEADERS_MAX = 64
JSON_DEPTH_MAX = 32  # the admin API's bodies are flat objects
JSON_NUMBER_CHARS_MAX = 40  # digits, sign, point and exponent of one JSON number
REQUEST_TIMEOUT_S = 5.0  # whole request (head and body) must arrive within this
WRITE_TIMEOUT_S = 10.0  # a client that does not read its answer is dropped
CONNECTION_LIFETIME_MAX_S = 60.0  # request, handler and answer together
CONNECTIONS_MAX = 64
PER_CLIENT_MAX = 16  # connections from one client address
HEALTH_RESERVE = 4  # extra connections, beyond CONNECTIONS_MAX, for the health paths only
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
SINGLE_HEADERS = ("content-length", "transfer-encoding", "authorization", "content-type", "host")

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Server": "extrabalance-admin",  # not the library and its version
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
    headers: dict[str, str]  # lower-case names (the single-valued ones are checked unique)


def _bounded_number(text: str) -> Any:
    if len(text) > JSON_NUMBER_CHARS_MAX:
        raise HttpError(400, f"a JSON number longer than {JSON_NUMBER_CHARS_MAX} characters")
    return float(text) if any(c in text for c in ".eE") else int(text)


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in `text` (brackets inside strings skipped). Pure,
    linear, no recursion: it runs before the parser so a 10,000-deep body costs nothing."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json_body(body: bytes) -> Any:
    """The JSON value of `body`, bounded in depth and number size; HttpError 400 otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HttpError(400, f"malformed JSON body: {exc}") from None
    if json_depth(text) > JSON_DEPTH_MAX:
        raise HttpError(400, f"JSON nested deeper than {JSON_DEPTH_MAX} levels")
    try:
        return json.loads(
            text,
            parse_int=_bounded_number,
            parse_float=_bounded_number,
            parse_constant=_no_constant,
        )
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise HttpError(400, f"malformed JSON body: {exc}") from None


def _no_constant(name: str) -> Any:
    raise HttpError(400, f"malformed JSON body: {name} is not JSON")


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
        return parse_json_body(self.body)


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


def render_response(response: Response) -> bytes:
    """Status line, headers and body of a `Connection: close` response, for the answers
    written before aiohttp has a request (408, 503 on admission). Pure."""
    reason = REASONS.get(response.status, "Status")
    headers = {
        "Content-Type": response.content_type,
        "Content-Length": str(len(response.body)),
        "Connection": "close",
        **SECURITY_HEADERS,
        **response.headers,
    }
    head = (
        f"HTTP/1.1 {response.status} {reason}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    )
    return head.encode("latin-1") + response.body


Handler = Callable[[Request], Awaitable[Response]]


class Admission:
    """Who may hold a connection. Pure bookkeeping, no sockets: `admit` says which
    connection (if any) a newcomer displaces, and `ready` marks one that has sent its
    whole request head (it is then being served and is never displaced).

    The rule: a client address holds at most `per_client_max` connections and all
    clients together `connections_max`. A newcomer over either bound displaces the
    oldest not-yet-ready connection in that bound (of the same client for the
    per-client bound); when none is idle, it may still take one of `health_reserve`
    extra slots, which serve the health paths only."""

    GENERAL, HEALTH = "general", "health"

    def __init__(self, connections_max: int, per_client_max: int, health_reserve: int) -> None:
        self.connections_max = connections_max
        self.per_client_max = per_client_max
        self.health_reserve = health_reserve
        self._idle: OrderedDict[object, str] = OrderedDict()  # not ready, oldest first
        self._client: dict[object, str] = {}  # every general connection → client
        self._per_client: dict[str, int] = {}
        self._health: set[object] = set()

    def __len__(self) -> int:
        return len(self._client) + len(self._health)

    @property
    def waiting(self) -> int:
        """Connections admitted that have not yet sent their whole request head (the
        ones a newcomer over a bound may displace)."""
        return len(self._idle)

    def admit(self, conn: object, client: str) -> tuple[str | None, object | None]:
        """(slot kind or None when refused, connection to displace or None)."""
        displaced: object | None = None
        if self._per_client.get(client, 0) >= self.per_client_max:
            displaced = next((c for c, who in self._idle.items() if who == client), None)
            if displaced is None:
                return self._take_health(conn)
        elif len(self._client) >= self.connections_max:
            displaced = next(iter(self._idle), None)
            if displaced is None:
                return self._take_health(conn)
        if displaced is not None:
            self.release(displaced)
        self._client[conn] = client
        self._per_client[client] = self._per_client.get(client, 0) + 1
        self._idle[conn] = client
        return self.GENERAL, displaced

    def _take_health(self, conn: object) -> tuple[str | None, object | None]:
        if len(self._health) >= self.health_reserve:
            return None, None
        self._health.add(conn)
        return self.HEALTH, None

    def ready(self, conn: object) -> None:
        self._idle.pop(conn, None)

    def release(self, conn: object) -> None:
        self._idle.pop(conn, None)
        self._health.discard(conn)
        client = self._client.pop(conn, None)
        if client is not None:
            left = self._per_client[client] - 1
            if left:
                self._per_client[client] = left
            else:
                del self._per_client[client]


def _client_of(transport: asyncio.BaseTransport) -> tuple[str, str]:
    peername = transport.get_extra_info("peername")
    if isinstance(peername, tuple):
        return str(peername[0]), f"{peername[0]}:{peername[1]}"
    return str(peername), str(peername)


class _Connection(RequestHandler):
    """aiohttp's per-connection protocol, with admission, a request deadline and
    JSON error answers for requests the parser refuses."""

    def __init__(self, owner: HttpServer, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.owner = owner
        self.slot: str | None = None
        self.peer = "?"
        self.deadline = 0.0
        self.client_eof = False
        self._timer: asyncio.TimerHandle | None = None
        self._lifetime: asyncio.TimerHandle | None = None
        self._raw_transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._raw_transport = transport  # type: ignore[assignment]
        client, self.peer = _client_of(transport)
        self.slot, displaced = self.owner.admission.admit(self, client)
        if isinstance(displaced, _Connection):
            displaced.answer_and_close(
                503,
                "connection displaced: the admin API is busy and this connection sent no request",
            )
        if self.slot is None:
            self.answer_and_close(503, "too many admin connections")
            return
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.owner.request_timeout_s
        self._timer = loop.call_at(self.deadline, self._request_overdue)
        self._lifetime = loop.call_later(CONNECTION_LIFETIME_MAX_S, self._abort)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.owner.admission.release(self)
        for timer in (self._timer, self._lifetime):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    # asyncio.Protocol.eof_received may return True (keep the transport open); aiohttp
    # declares its own as returning None.
    def eof_received(self) -> bool:  # type: ignore[override]
        # The client closed its side: a body still expected will never come. Keep the
        # transport open to answer (400 "body shorter than Content-Length"); the
        # request deadline still closes it if no whole head ever came.
        self.client_eof = True
        bodies = [payload for _, payload in self._messages]
        if self._current_request is not None:
            bodies.append(self._current_request.content)
        for body in bodies:
            if not body.is_eof():
                body.feed_eof()
        return True

    def head_complete(self) -> None:
        self.owner.admission.ready(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _request_overdue(self) -> None:
        self._timer = None
        self.answer_and_close(408, f"request not complete within {self.owner.request_timeout_s} s")

    def _abort(self) -> None:
        if self._raw_transport is not None:
            self._raw_transport.abort()

    def answer_and_close(self, status: int, message: str) -> None:
        """Answer before any request reached the router, and close."""
        self.owner.admission.release(self)
        transport = self._raw_transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(Exception):
            transport.write(render_response(error_response(status, message)))
        transport.close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, http_exceptions.LineTooLong):
            status, text = 431, f"a request or header line longer than {LINE_BYTES_MAX} bytes"
        elif isinstance(exc, http_exceptions.HttpProcessingError):
            status = exc.code if 400 <= exc.code < 600 else 400
            text = f"malformed request: {exc.message}"
            if "header" in exc.message.lower() and "too many" in exc.message.lower():
                status = 431
        else:
            text = "internal error; see the node's log"
        if status >= 500:
            log.error(
                "admin_http_error",
                peer=self.peer,
                status=status,
                error=type(exc).__name__ if exc else None,
            )
        else:
            log.info("admin_http_bad_request", peer=self.peer, status=status, reason=text[:200])
        response = _to_web(error_response(status, text))
        return response


def _to_web(response: Response) -> web.Response:
    out = web.Response(
        status=response.status, body=response.body, reason=REASONS.get(response.status)
    )
    out.headers["Content-Type"] = response.content_type
    out.headers.update(SECURITY_HEADERS)
    out.headers.update(response.headers)
    out.force_close()
    return out


class HttpServer:
    """`await HttpServer(handler).start(host, port)` → bound port; `await close()`."""

    def __init__(
        self,
        handler: Handler,
        *,
        connections_max: int = CONNECTIONS_MAX,
        per_client_max: int = PER_CLIENT_MAX,
        health_reserve: int = HEALTH_RESERVE,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        health_paths: frozenset[str] = HEALTH_PATHS,
    ) -> None:
        self.handler = handler
        self.request_timeout_s = request_timeout_s
        self.health_paths = health_paths
        self.admission = Admission(connections_max, per_client_max, health_reserve)
        self._server: asyncio.Server | None = None
        self._aio: web.Server | None = None
        self.port = 0

    @property
    def connections(self) -> int:
        return len(self.admission)

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {
            "max_line_size": LINE_BYTES_MAX,
            "max_field_size": LINE_BYTES_MAX,
            "max_headers": HEADERS_MAX,
            "access_log": None,
            "keepalive_timeout": self.request_timeout_s + WRITE_TIMEOUT_S,
            "lingering_time": 0.0,
        }
        aio = self._aio = web.Server(self._serve, loop=loop, handler_cancellation=True)
        self._server = await loop.create_server(
            lambda: _Connection(self, aio, loop=loop, **kwargs), host, port
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            if self._aio is not None:
                with contextlib.suppress(Exception):
                    await self._aio.shutdown(1.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None

    async def _serve(self, raw: web.BaseRequest) -> web.StreamResponse:
        conn = raw.protocol
        assert isinstance(conn, _Connection)
        conn.head_complete()
        if conn.client_eof and not raw.content.is_eof():
            raw.content.feed_eof()
        try:
            if conn.slot == Admission.HEALTH and raw.path not in self.health_paths:
                raise HttpError(503, "too many admin connections")
            request = await self._read(raw, conn)
        except HttpError as exc:
            return _to_web(error_response(exc.status, exc.message, exc.headers))
        try:
            response = await self.handler(request)
        except HttpError as exc:
            response = error_response(exc.status, exc.message, exc.headers)
        except Exception:  # never let one request take the server down
            log.exception("admin_http_handler_error", method=raw.method, path=raw.path)
            response = error_response(500, "internal error; see the node's log")
        return _to_web(response)

    async def _read(self, raw: web.BaseRequest, conn: _Connection) -> Request:
        if raw.version.major != 1:
            raise HttpError(
                505, f"unsupported version HTTP/{raw.version.major}.{raw.version.minor}"
            )
        for name in SINGLE_HEADERS:
            if len(raw.headers.getall(name, ())) > 1:
                raise HttpError(400, f"header {name} given more than once")
        if "transfer-encoding" in raw.headers:
            raise HttpError(501, "Transfer-Encoding is not supported; send Content-Length")
        length = raw.content_length or 0
        if length > BODY_BYTES_MAX:
            raise HttpError(413, f"body larger than {BODY_BYTES_MAX} bytes")
        body = b""
        if length:
            try:
                async with asyncio.timeout_at(conn.deadline):
                    body = await raw.content.read(length)
                    while len(body) < length and not raw.content.at_eof():
                        body += await raw.content.read(length - len(body))
            except TimeoutError:
                raise HttpError(
                    408, f"request not complete within {self.request_timeout_s} s"
                ) from None
            if len(body) < length:
                raise HttpError(400, "body shorter than Content-Length")
        headers = {k.lower(): v for k, v in raw.headers.items()}
        head = RequestHead(
            raw.method,
            raw.path,
            parse_qs(raw.query_string),
            f"HTTP/{raw.version.major}.{raw.version.minor}",
            headers,
        )
        return Request(head, body, conn.peer)
