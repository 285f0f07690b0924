"""The admin transport under attack: connection starvation, framing ambiguity, hostile
JSON (issue 22, finding 1 and the low findings on the admin API)."""

from __future__ import annotations

import asyncio
import json

import pytest

from extrabalance.admin.http import (
    JSON_DEPTH_MAX,
    Admission,
    HttpServer,
    Request,
    Response,
    json_response,
)
from tests.admin.client import call, parse_reply, raw_call

SLOW_IN_HANDLER = [0]


@pytest.fixture
async def server():
    SLOW_IN_HANDLER[0] = 0

    async def handler(request: Request) -> Response:
        if request.path == "/slow":
            SLOW_IN_HANDLER[0] += 1
            await asyncio.sleep(30)
        return json_response(
            200,
            {"path": request.path, "body": request.json(), "auth": request.header("authorization")},
        )

    # Short, so the siege below cycles (408, reconnect) quickly; not so short that a
    # health check on a busy machine (the suite runs on several workers) is itself cut
    # off before its event loop gets to read the head it sent at once.
    srv = HttpServer(handler, request_timeout_s=3.0)
    port = await srv.start("127.0.0.1", 0)
    yield srv, port
    await srv.close()


async def _slow_client(port: int, source: str, stop: asyncio.Event, opened: list[int]) -> None:
    """Sends half a request head, waits to be thrown out (408 or displaced), reconnects."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
        except OSError:
            await asyncio.sleep(0.05)
            continue
        opened[0] += 1
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
            await reader.read()
        except OSError:
            pass
        finally:
            writer.close()
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "sources",
    [
        ["127.0.0.2"],  # one attacker: the per-client bound holds him
        [f"127.0.0.{i}" for i in range(2, 7)],  # 5 addresses x 14: the total bound is the one hit
    ],
    ids=["one-address", "five-addresses"],
)
async def test_seventy_slow_reconnecting_clients_cannot_starve_healthz(server, sources):
    """Finding 1: 70 sockets that never finish a request and reconnect after each 408
    kept the 64-slot cap full and every /healthz (from the health checker's own
    address) got 503. Now one address holds at most PER_CLIENT_MAX slots, and an idle
    socket yields its slot to a newcomer once the total is reached."""
    _srv, port = server
    stop, opened = asyncio.Event(), [0]
    siege = [
        asyncio.create_task(_slow_client(port, sources[i % len(sources)], stop, opened))
        for i in range(70)
    ]
    try:
        async with asyncio.timeout(60):
            while opened[0] < 70:
                await asyncio.sleep(0.01)
        statuses = []
        for _ in range(40):
            statuses.append((await call(port, "GET", "/healthz")).status)
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        for task in siege:
            task.cancel()
        await asyncio.gather(*siege, return_exceptions=True)
    assert statuses == [200] * 40


def test_admission_per_client_bound_displaces_that_clients_oldest_idle_connection():
    adm = Admission(connections_max=10, per_client_max=2, health_reserve=1)
    assert adm.admit("a1", "A") == ("general", None)
    assert adm.admit("a2", "A") == ("general", None)
    assert adm.admit("b1", "B") == ("general", None)
    assert adm.admit("a3", "A") == ("general", "a1")  # A's oldest idle, never B's
    adm.ready("a2")
    adm.ready("a3")
    assert adm.admit("a4", "A") == ("health", None)  # A's are all being served
    assert adm.admit("a5", "A") == (None, None)  # and the reserve is taken


def test_admission_total_bound_displaces_the_oldest_idle_connection():
    adm = Admission(connections_max=2, per_client_max=2, health_reserve=1)
    adm.admit("a", "A")
    adm.admit("b", "B")
    adm.ready("a")
    assert adm.admit("c", "C") == ("general", "b")
    adm.ready("c")
    assert adm.admit("d", "D") == ("health", None)
    adm.release("a")
    assert adm.admit("e", "E") == ("general", None)
    assert len(adm) == 3


async def test_reserved_slot_serves_health_only(server):
    """With every slot busy serving, /healthz still answers; other paths get 503."""
    _srv, port = server
    slow = [asyncio.create_task(call(port, "GET", "/slow")) for _ in range(16)]
    try:
        async with asyncio.timeout(60):
            while SLOW_IN_HANDLER[0] < 16:
                await asyncio.sleep(0.01)
        assert (await call(port, "GET", "/healthz")).status == 200
        assert (await call(port, "GET", "/other")).status == 503
    finally:
        for t in slow:
            t.cancel()
        await asyncio.gather(*slow, return_exceptions=True)


async def test_duplicate_content_length_is_400(server):
    _, port = server
    raw = (
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}"
    )
    reply = parse_reply(await raw_call(port, raw))
    assert reply.status == 400 and "error" in reply.json()


async def test_duplicate_authorization_is_400(server):
    _, port = server
    raw = (
        b"GET /x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer one\r\n"
        b"Authorization: Bearer two\r\n\r\n"
    )
    reply = parse_reply(await raw_call(port, raw))
    assert reply.status == 400 and "authorization" in reply.json()["error"]


async def test_huge_content_length_is_400_not_a_dropped_connection(server):
    _, port = server
    raw = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n"
    reply = parse_reply(await raw_call(port, raw))
    assert reply.status == 400 and "error" in reply.json()


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 10_000 + b"]" * 10_000,
        b'{"a":' * (JSON_DEPTH_MAX + 1) + b"1" + b"}" * (JSON_DEPTH_MAX + 1),
        b'{"amount_minor": ' + b"9" * 5000 + b"}",
        b'{"amount_minor": 1e' + b"9" * 100 + b"}",
    ],
)
async def test_hostile_json_is_400_not_500(server, body):
    _, port = server
    reply = await call(port, "POST", "/x", raw_body=body)
    assert reply.status == 400, reply.body
    assert (await call(port, "GET", "/ok")).status == 200


async def test_json_inside_the_bounds_is_read(server):
    _, port = server
    nested: object = 1
    for _ in range(JSON_DEPTH_MAX - 1):
        nested = {"a": nested}
    body = {"n": nested, "s": '[[[[ not nesting ]]]] " {{{', "big": 10**30, "x": 1.5e10}
    reply = await call(port, "POST", "/x", body=body)
    assert reply.status == 200 and reply.json()["body"] == json.loads(json.dumps(body))
