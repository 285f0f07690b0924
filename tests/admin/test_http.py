"""The admin API's HTTP layer alone: parsing, bounds, timeouts, bad input."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extrabalance.admin.http import (
    BODY_BYTES_MAX,
    HEAD_BYTES_MAX,
    HttpServer,
    Request,
    Response,
    json_response,
    render_response,
)
from tests.admin.client import call, parse_reply, raw_call


async def test_reads_method_path_query_headers(server):
    _, port = server
    reply = await call(port, "GET", "/echo/x%2Fy?a=1&a=2", headers={"X-Thing": "  v "})
    assert reply.json() == {"path": "/echo/x/y", "query": {"a": ["1", "2"]}, "thing": "v"}


@pytest.mark.parametrize("raw, status", [
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"G\xffT / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"\r\n".join(b"h%d: v" % i for i in range(100)) + b"\r\n\r\n", 431),
])
async def test_malformed_heads_are_refused(server, raw, status):
    _, port = server
    reply = parse_reply(await raw_call(port, raw))
    assert reply.status == status and "error" in reply.json()


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
async def test_random_bytes_never_hurt_the_server(server, raw):
    _, port = server
    await raw_call(port, raw + b"\r\n\r\n", timeout_s=5)
    assert (await call(port, "GET", "/ok")).status == 200


def test_render_response_closes_and_counts():
    out = render_response(json_response(200, {"a": 1}))
    reply = parse_reply(out)
    assert reply.status == 200
    assert reply.headers["connection"] == "close"
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert reply.json() == {"a": 1}


@pytest.fixture
async def server():
    async def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        if request.path == "/slow":
            await asyncio.sleep(5)
        if request.path.startswith("/echo/"):
            return json_response(200, {"path": request.path, "query": request.head.query,
                                       "thing": request.header("x-thing")})
        return json_response(200, {"path": request.path, "body": request.json()})

    srv = HttpServer(handler, request_timeout_s=0.3, connections_max=4)
    port = await srv.start("127.0.0.1", 0)
    yield srv, port
    await srv.close()


async def test_roundtrip_with_json_body(server):
    _, port = server
    reply = await call(port, "POST", "/x", body={"k": [1, 2]})
    assert reply.status == 200 and reply.json() == {"path": "/x", "body": {"k": [1, 2]}}


async def test_malformed_json_is_400(server):
    _, port = server
    reply = await call(port, "POST", "/x", raw_body=b"{not json")
    assert reply.status == 400 and "malformed JSON" in reply.json()["error"]


async def test_wrong_content_type_is_415(server):
    _, port = server
    reply = await call(port, "POST", "/x", raw_body=b"a=1",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 415


async def test_body_too_large_is_413_without_reading_it(server):
    _, port = server
    head = f"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: {BODY_BYTES_MAX + 1}\r\n\r\n".encode()
    assert parse_reply(await raw_call(port, head)).status == 413


async def test_head_too_large_is_431(server):
    _, port = server
    raw = b"GET / HTTP/1.1\r\nX: " + b"a" * (HEAD_BYTES_MAX + 10) + b"\r\n\r\n"
    assert parse_reply(await raw_call(port, raw)).status == 431


async def test_chunked_is_refused(server):
    _, port = server
    raw = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert parse_reply(await raw_call(port, raw)).status == 501


async def test_slow_client_gets_408(server):
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\n")  # and never finishes the head
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert parse_reply(out).status == 408


async def test_short_body_is_400_after_timeout(server):
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n{}")
    writer.write_eof()
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert parse_reply(out).status == 400


async def test_handler_error_is_500_and_server_lives_on(server):
    _, port = server
    reply = await call(port, "GET", "/boom")
    assert reply.status == 500 and "handler bug" not in reply.body.decode()
    assert (await call(port, "GET", "/ok")).status == 200


async def test_connections_beyond_the_bound_get_503(server):
    srv, port = server
    slow = [asyncio.create_task(call(port, "GET", "/slow")) for _ in range(4)]
    # All four admitted AND being served: one still sending its head would be
    # displaced by the newcomer (the bound's rule), which is not what this test is about.
    while srv.connections < 4 or srv.admission.waiting:
        await asyncio.sleep(0.01)
    reply = await call(port, "GET", "/ok")
    assert reply.status == 503
    for t in slow:
        t.cancel()
    await asyncio.gather(*slow, return_exceptions=True)


async def test_client_that_disconnects_mid_head_does_not_hurt(server):
    _, port = server
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HT")
    writer.close()
    assert (await call(port, "GET", "/ok")).status == 200
