"""DiameterNode over loopback: peers, failover, duplicates, shutdown, TLS."""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from extrabalance.diameter import codec, gy
from extrabalance.diameter.aio.node import (
    DiameterNode,
    LocalIdentity,
    NoPeerAvailable,
    PeerAddress,
    RequestTimeout,
)
from extrabalance.diameter.codec import DiameterError, Message, avp, decode, encode

from .helpers import sample_ccr

NODE_ID = LocalIdentity("eb.node.example", "node.example", origin_state_id=1)
IN_A_ID = LocalIdentity("in-a.operator.example", "operator.example", origin_state_id=1)
IN_B_ID = LocalIdentity("in-b.operator.example", "operator.example", origin_state_id=1)


@dataclass
class Recorder:
    """A request handler that answers 2001 and remembers what it saw."""

    name: str
    seen: list[Message] = field(default_factory=list)
    delay_s: float = 0.0
    hang: bool = False

    async def __call__(self, msg: Message, peer: str) -> Message:
        self.seen.append(msg)
        if self.hang:
            await asyncio.Event().wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        ccr = gy.parse_ccr(msg)  # raises DiameterError: the node answers it
        return gy.build_cca(msg, self.name, "operator.example", 2001,
                            granted_minor=len(self.seen), currency_numeric=818,
                            currency_exponent=2, event_timestamp=ccr.event_timestamp)


class BlackHoleProxy:
    """TCP proxy that can stop forwarding (a peer that goes silent, socket still up)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.silent = False
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if not self.silent:
                        dst.write(data)
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server:
            self.server.close()


@pytest.fixture
async def nodes() -> AsyncIterator[Callable[..., DiameterNode]]:
    made: list[DiameterNode] = []

    def make(identity: LocalIdentity, handler: Recorder | None = None,
             allowed: set[str] | None = None, **kw: object) -> DiameterNode:
        node = DiameterNode(identity, allowed_peers=allowed,
                            request_handler=handler or Recorder(identity.origin_host),
                            **kw)  # type: ignore[arg-type]
        made.append(node)
        return node

    yield make
    for node in made:
        await node.close()


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout_s)


def states(node: DiameterNode) -> dict[str, str]:
    return {row["origin_host"]: row["state"] for row in node.peer_states()
            if row["direction"] == "out"}


async def test_cer_cea_and_a_request(nodes: Callable[..., DiameterNode]) -> None:
    server_handler = Recorder(IN_A_ID.origin_host)
    server = nodes(IN_A_ID, server_handler, allowed={NODE_ID.origin_host})
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed={IN_A_ID.origin_host})
    client.add_peer_group("in-a", "operator.example",
                          [PeerAddress("127.0.0.1", port, IN_A_ID.origin_host)])
    await client.wait_ready("in-a", 5.0)
    answer = await client.request("in-a", sample_ccr())
    parsed = gy.parse_cca(answer)
    assert parsed.result_code == 2001 and parsed.origin_host == IN_A_ID.origin_host
    [seen] = server_handler.seen
    assert seen.end_to_end_id == answer.end_to_end_id and not seen.is_retransmit
    inbound = [r for r in server.peer_states() if r["direction"] == "in"]
    assert inbound[0]["origin_host"] == NODE_ID.origin_host and inbound[0]["state"] == "Open"
    assert states(client) == {IN_A_ID.origin_host: "Open"}


async def _raw_exchange(port: int, frames: list[bytes]) -> tuple[list[Message], bool]:
    """Send frames on a bare TCP connection; return the answers and whether it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for frame in frames:
        writer.write(frame)
    framer = codec.Framer()
    got: list[Message] = []
    closed = False
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 1.0)
            if not data:
                closed = True
                break
            got += [decode(f) for f in framer.feed(data)]
    except TimeoutError:
        pass
    writer.close()
    return got, closed


def _cer(origin_host: str, apps: tuple[int, ...] = (4,)) -> bytes:
    avps = [avp(264, origin_host), avp(296, "node.example"),
            avp(257, __import__("ipaddress").ip_address("127.0.0.1")), avp(266, 0),
            avp(269, "raw-test"), *[avp(258, a) for a in apps]]
    return encode(codec.request(257, 0, avps, proxiable=False, hop_by_hop_id=1,
                                end_to_end_id=1))


async def test_unknown_peer_gets_3010_and_is_disconnected(
        nodes: Callable[..., DiameterNode]) -> None:
    server = nodes(IN_A_ID, allowed={NODE_ID.origin_host})
    port = await server.listen("127.0.0.1", 0)
    [cea], closed = await _raw_exchange(port, [_cer("stranger.example")])
    assert cea.get(268) == 3010 and cea.is_error and closed
    # and a DiameterNode client that is not allowed keeps the reason
    client = nodes(LocalIdentity("stranger.example", "x"), allowed=None, reconnect_min_s=5.0)
    client.add_peer_group("in", "operator.example", [PeerAddress("127.0.0.1", port)])
    await wait_for(lambda: "3010" in str(client.peer_states()[0]["last_error"]))


async def test_no_common_application_gets_5010(nodes: Callable[..., DiameterNode]) -> None:
    server = nodes(IN_A_ID, allowed={NODE_ID.origin_host})
    port = await server.listen("127.0.0.1", 0)
    [cea], closed = await _raw_exchange(port, [_cer(NODE_ID.origin_host, apps=(16777238,))])
    assert cea.get(268) == 5010 and not cea.is_error and closed


async def test_undecodable_frame_closes_only_that_connection(
        nodes: Callable[..., DiameterNode]) -> None:
    server = nodes(IN_A_ID, allowed={NODE_ID.origin_host, "raw.example"})
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed={IN_A_ID.origin_host})
    client.add_peer_group("in", "operator.example", [PeerAddress("127.0.0.1", port)])
    await client.wait_ready("in", 5.0)
    answers, closed = await _raw_exchange(port, [_cer("raw.example"), b"\x09" + bytes(19)])
    assert answers[0].get(268) == 2001 and closed
    assert gy.parse_cca(await client.request("in", sample_ccr())).result_code == 2001


async def test_malformed_requests_answered_without_the_handler(
        nodes: Callable[..., DiameterNode]) -> None:
    handler = Recorder("in")
    server = nodes(IN_A_ID, handler, allowed={NODE_ID.origin_host})
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed=None)
    client.add_peer_group("in", "operator.example", [PeerAddress("127.0.0.1", port)])
    await client.wait_ready("in", 5.0)
    no_origin = sample_ccr()._replace(avps=tuple(a for a in sample_ccr().avps if a.code != 264))
    answer = await client.request("in", no_origin)
    assert answer.get(268) == 5005 and answer.path(279, 264) is not None
    wrong_app = sample_ccr()._replace(application_id=16777238)
    answer = await client.request("in", wrong_app)
    assert answer.get(268) == 3007 and answer.is_error
    assert handler.seen == []
    # the handler's own DiameterError (parse_ccr: no Subscription-Id) becomes the answer
    no_sub = sample_ccr()._replace(avps=tuple(a for a in sample_ccr().avps if a.code != 443))
    answer = await client.request("in", no_sub)
    assert answer.get(268) == 5005 and answer.path(279, 443) is not None


async def test_requests_run_concurrently_and_answers_return_as_they_complete(
        nodes: Callable[..., DiameterNode]) -> None:
    async def handler(msg: Message, peer: str) -> Message:
        await asyncio.sleep(msg.path_value(437, 413, 445, 447) / 1000)
        return gy.build_cca(msg, "in", "r", 2001, currency_numeric=818, currency_exponent=2)

    server = DiameterNode(IN_A_ID, allowed_peers=None, request_handler=handler)
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed=None)
    client.add_peer_group("in", "operator.example", [PeerAddress("127.0.0.1", port)])
    await client.wait_ready("in", 5.0)
    order: list[int] = []

    async def one(delay_ms: int) -> None:
        await client.request("in", sample_ccr(requested_minor=delay_ms))
        order.append(delay_ms)

    try:
        await asyncio.gather(one(300), one(150), one(0))
        assert order == [0, 150, 300]
    finally:
        await server.close()


async def test_a_handler_that_answers_at_once_costs_no_task(
        nodes: Callable[..., DiameterNode]) -> None:
    seen: list[Message] = []

    def handler(msg: Message, peer: str) -> Message:
        seen.append(msg)
        ccr = gy.parse_ccr(msg)  # raises DiameterError: the node answers it
        return gy.build_cca(msg, "in", "operator.example", 2001, granted_minor=len(seen),
                            currency_numeric=818, currency_exponent=2,
                            event_timestamp=ccr.event_timestamp).with_ids(1, 2)

    server = nodes(IN_A_ID, handler, allowed=None)
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed=None)
    client.add_peer_group("in", "operator.example", [PeerAddress("127.0.0.1", port)])
    await client.wait_ready("in", 5.0)
    tasks_before = len(asyncio.all_tasks())
    first = await client.request("in", sample_ccr().with_ids(0, 4243))
    assert len(asyncio.all_tasks()) == tasks_before and not server._tasks
    # sent on the request's ids whatever the handler set
    assert gy.parse_cca(first).result_code == 2001 and first.end_to_end_id == 4243
    # kept for a T-flagged copy, as an answer that came from a task
    again = await client.request("in", sample_ccr().with_ids(0, 4243).with_flags(
        codec.FLAG_RETRANSMIT))
    assert len(seen) == 1 and again.avps == first.avps
    # the handler's DiameterError becomes the answer (no Subscription-Id: 5005)
    no_sub = sample_ccr()._replace(avps=tuple(a for a in sample_ccr().avps if a.code != 443))
    answer = await client.request("in", no_sub)
    assert answer.get(268) == 5005 and answer.path(279, 443) is not None


async def test_duplicate_t_flag_request_answered_from_cache(
        nodes: Callable[..., DiameterNode]) -> None:
    handler = Recorder("in")
    server = nodes(IN_A_ID, handler, allowed=None)
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed=None)
    client.add_peer_group("in", "operator.example", [PeerAddress("127.0.0.1", port)])
    await client.wait_ready("in", 5.0)
    first = await client.request("in", sample_ccr().with_ids(0, 4242))
    again = await client.request("in", sample_ccr().with_ids(0, 4242).with_flags(
        codec.FLAG_RETRANSMIT))
    assert len(handler.seen) == 1
    assert again.avps == first.avps and again.end_to_end_id == 4242
    # a new End-to-End id is a new request
    await client.request("in", sample_ccr().with_flags(codec.FLAG_RETRANSMIT))
    assert len(handler.seen) == 2


async def test_duplicate_while_first_still_in_handler(nodes: Callable[..., DiameterNode]) -> None:
    handler = Recorder("in", delay_s=0.2)
    server = nodes(IN_A_ID, handler, allowed=None)
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed=None)
    client.add_peer_group("in", "operator.example", [PeerAddress("127.0.0.1", port)])
    await client.wait_ready("in", 5.0)
    msg = sample_ccr().with_ids(0, 777)
    a, b = await asyncio.gather(client.request("in", msg),
                                client.request("in", msg.with_flags(codec.FLAG_RETRANSMIT)))
    assert len(handler.seen) == 1 and a.avps == b.avps


async def test_timeout_fails_over_with_t_flag_then_request_timeout(
        nodes: Callable[..., DiameterNode]) -> None:
    slow_a = Recorder(IN_A_ID.origin_host, hang=True)
    server_a = nodes(IN_A_ID, slow_a, allowed=None)
    port_a = await server_a.listen("127.0.0.1", 0)
    b = Recorder(IN_B_ID.origin_host)
    server_b = nodes(IN_B_ID, b, allowed=None)
    port_b = await server_b.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed=None, request_timeout_ms=200)
    client.add_peer_group("in", "operator.example", [
        PeerAddress("127.0.0.1", port_a, IN_A_ID.origin_host),
        PeerAddress("127.0.0.1", port_b, IN_B_ID.origin_host)])
    await wait_for(lambda: set(states(client).values()) == {"Open"} and len(states(client)) == 2)
    answer = await client.request("in", sample_ccr())
    assert gy.parse_cca(answer).origin_host == IN_B_ID.origin_host
    [first] = slow_a.seen
    [second] = b.seen
    assert not first.is_retransmit and second.is_retransmit
    assert first.end_to_end_id == second.end_to_end_id
    assert first.session_id == second.session_id
    # only slow peers left: the outcome is unknown
    lonely = nodes(NODE_ID, allowed=None, request_timeout_ms=100)
    lonely.add_peer_group("in", "operator.example", [PeerAddress("127.0.0.1", port_a)])
    await lonely.wait_ready("in", 5.0)
    with pytest.raises(RequestTimeout):
        await lonely.request("in", sample_ccr())


async def test_no_open_peer_raises_no_peer_available(nodes: Callable[..., DiameterNode]) -> None:
    client = nodes(NODE_ID, allowed=None, reconnect_min_s=5.0)
    client.add_peer_group("in", "operator.example", [PeerAddress("127.0.0.1", 1)])
    with pytest.raises(NoPeerAvailable):
        await client.request("in", sample_ccr())
    with pytest.raises(KeyError):
        await client.request("elsewhere", sample_ccr())


async def test_watchdog_failover_and_failback(nodes: Callable[..., DiameterNode]) -> None:
    a = Recorder(IN_A_ID.origin_host)
    server_a = nodes(IN_A_ID, a, allowed=None)
    port_a = await server_a.listen("127.0.0.1", 0)
    proxy = BlackHoleProxy(port_a)
    proxy_port = await proxy.start()
    b = Recorder(IN_B_ID.origin_host)
    server_b = nodes(IN_B_ID, b, allowed=None)
    port_b = await server_b.listen("127.0.0.1", 0)
    # Failover must come from the watchdog here, not from the request deadline.
    client = nodes(NODE_ID, allowed=None, watchdog_s=0.3, request_timeout_ms=20000,
                   reconnect_min_s=0.1, reconnect_max_s=0.2)
    client.add_peer_group("in", "operator.example", [
        PeerAddress("127.0.0.1", proxy_port, IN_A_ID.origin_host),
        PeerAddress("127.0.0.1", port_b, IN_B_ID.origin_host)])
    try:
        await wait_for(lambda: list(states(client).values()) == ["Open", "Open"])
        # DWR/DWA keep both open over several Tw
        await asyncio.sleep(1.0)
        assert list(states(client).values()) == ["Open", "Open"]
        proxy.silent = True  # A stops answering anything, DWR included
        answer = await asyncio.wait_for(client.request("in", sample_ccr()), 5.0)
        assert gy.parse_cca(answer).origin_host == IN_B_ID.origin_host
        assert b.seen[-1].is_retransmit
        assert a.seen == []  # the proxy swallowed it
        await wait_for(lambda: states(client)[IN_A_ID.origin_host] != "Open")
        proxy.silent = False  # A is back: the link redials and A takes traffic again
        await wait_for(lambda: states(client).get(IN_A_ID.origin_host) == "Open", 10.0)
        for _ in range(4):
            await client.request("in", sample_ccr())
        assert a.seen and not a.seen[-1].is_retransmit
    finally:
        await proxy.close()


async def test_close_sends_dpr(nodes: Callable[..., DiameterNode],
                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="extrabalance.diameter.aio.node")
    server = nodes(IN_A_ID, allowed=None)
    port = await server.listen("127.0.0.1", 0)
    client = DiameterNode(NODE_ID, allowed_peers=None, request_handler=Recorder("x"))
    client.add_peer_group("in", "operator.example", [PeerAddress("127.0.0.1", port)])
    await client.wait_ready("in", 5.0)
    await client.close()
    await wait_for(lambda: not [r for r in server.peer_states() if r["direction"] == "in"])
    assert "peer disconnected (DPR)" in caplog.text
    assert "we disconnected (DPR)" in caplog.text


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed: cannot make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=in-a.operator.example", "-addext",
                    "subjectAltName=DNS:in-a.operator.example",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_diameter_over_tls(nodes: Callable[..., DiameterNode],
                                 tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    server = nodes(IN_A_ID, allowed=None, ssl_context=server_ctx)
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed=None, ssl_context=client_ctx)
    client.add_peer_group("in", "operator.example",
                          [PeerAddress("127.0.0.1", port, IN_A_ID.origin_host)])
    await client.wait_ready("in", 5.0)
    assert gy.parse_cca(await client.request("in", sample_ccr())).result_code == 2001


def test_handler_error_type_is_the_codec_error() -> None:
    # The contract handlers rely on: raise DiameterError, the node answers it.
    assert issubclass(DiameterError, Exception)


async def test_inbound_bound_answers_3004_too_busy(nodes: Callable[..., DiameterNode],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import extrabalance.diameter.aio.node as node_module

    monkeypatch.setattr(node_module, "INBOUND_CONCURRENT_MAX", 1)
    slow = Recorder("in", delay_s=0.3)
    server = nodes(IN_A_ID, slow, allowed=None)
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed=None)
    client.add_peer_group("in", "operator.example", [PeerAddress("127.0.0.1", port)])
    await client.wait_ready("in", 5.0)
    first, second = await asyncio.gather(client.request("in", sample_ccr()),
                                         client.request("in", sample_ccr()))
    assert first.get(268) == 2001
    assert second.get(268) == 3004 and second.is_error
    assert len(slow.seen) == 1
