"""The Diameter listener under attack (issue 22, findings 3 and 4): connection bounds,
one timer for a silent peer whether plain or TLS, and TLS that authenticates the IN:
the peer's certificate must name the Origin-Host it claims (RFC 6733 §13), both ways.
Certificates are made here, with a private CA, by the cryptography package."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from extrabalance.diameter.aio.node import (
    DiameterNode,
    LocalIdentity,
    PeerAddress,
    certificate_hosts,
)

from .test_node import IN_A_ID, NODE_ID, Recorder, wait_for

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class Pki:
    """A CA and the certificates it signs, written as PEM files under `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test operator CA")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(1)
            .not_valid_before(NOW)
            .not_valid_after(NOW + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, cn: str, dns: list[str]) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW)
            .not_valid_after(NOW + dt.timedelta(days=3650))
        )
        if dns:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file, key_file = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, key_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def server_ctx(pki: Pki, cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_file))
    ctx.load_cert_chain(*cert)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ctx(pki: Pki, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_file))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


@pytest.fixture
async def nodes() -> AsyncIterator[Callable[..., DiameterNode]]:
    made: list[DiameterNode] = []

    def make(identity: LocalIdentity, **kw: object) -> DiameterNode:
        node = DiameterNode(
            identity, allowed_peers=None, request_handler=Recorder(identity.origin_host), **kw
        )  # type: ignore[arg-type]
        made.append(node)
        return node

    yield make
    for node in made:
        await node.close()


async def tls_listener(nodes: Callable[..., DiameterNode], pki: Pki) -> tuple[DiameterNode, int]:
    """The node listening on TLS with its certificate, requiring the IN's from the CA."""
    node_cert = pki.issue("node", "eb.node.example", ["eb.node.example"])
    server = nodes(NODE_ID, ssl_context=server_ctx(pki, node_cert))
    return server, await server.listen("127.0.0.1", 0)


def inbound_open(node: DiameterNode) -> list[dict[str, object]]:
    return [r for r in node.peer_states() if r["direction"] == "in" and r["state"] == "Open"]


async def dial(
    nodes: Callable[..., DiameterNode],
    identity: LocalIdentity,
    port: int,
    ctx: ssl.SSLContext | None,
    expect_host: str,
) -> DiameterNode:
    client = nodes(identity, ssl_context=ctx)
    client.add_peer_group("g", "operator.example", [PeerAddress("127.0.0.1", port, expect_host)])
    return client


def test_certificate_hosts_reads_san_then_cn() -> None:
    assert certificate_hosts(
        {
            "subjectAltName": (("DNS", "In-A.Operator.Example"), ("IP Address", "10.0.0.1")),
            "subject": ((("commonName", "ignored"),),),
        }
    ) == {"in-a.operator.example"}
    assert certificate_hosts({"subject": ((("commonName", "in-b.operator.example"),),)}) == {
        "in-b.operator.example"
    }
    assert certificate_hosts({}) == frozenset()


async def test_an_in_whose_certificate_names_it_is_served(nodes, pki) -> None:
    node_cert = pki.issue("node", "eb.node.example", ["eb.node.example"])
    in_cert = pki.issue("in-a", "in-a.operator.example", ["in-a.operator.example"])
    server = nodes(NODE_ID, ssl_context=server_ctx(pki, node_cert))
    port = await server.listen("127.0.0.1", 0)
    await dial(nodes, IN_A_ID, port, client_ctx(pki, in_cert), NODE_ID.origin_host)
    await wait_for(lambda: bool(inbound_open(server)), 10.0)


async def test_a_ca_signed_certificate_for_another_host_is_refused(nodes, pki) -> None:
    """Finding 4: a certificate the CA signed for another host was accepted as in-a."""
    node_cert = pki.issue("node", "eb.node.example", ["eb.node.example"])
    other = pki.issue("other", "other.operator.example", ["other.operator.example"])
    server = nodes(NODE_ID, ssl_context=server_ctx(pki, node_cert))
    port = await server.listen("127.0.0.1", 0)
    client = await dial(nodes, IN_A_ID, port, client_ctx(pki, other), NODE_ID.origin_host)
    await wait_for(
        lambda: any(
            "TLS certificate" in str(r.get("last_error")) or "3010" in str(r.get("last_error"))
            for r in client.peer_states()
        ),
        10.0,
    )
    assert not inbound_open(server)


async def test_a_cn_only_certificate_names_its_host(nodes, pki) -> None:
    node_cert = pki.issue("node", "eb.node.example", ["eb.node.example"])
    cn_only = pki.issue("in-a-cn", "in-a.operator.example", [])
    server = nodes(NODE_ID, ssl_context=server_ctx(pki, node_cert))
    port = await server.listen("127.0.0.1", 0)
    await dial(nodes, IN_A_ID, port, client_ctx(pki, cn_only), NODE_ID.origin_host)
    await wait_for(lambda: bool(inbound_open(server)), 10.0)


async def test_no_client_certificate_no_service(nodes, pki) -> None:
    server, port = await tls_listener(nodes, pki)
    client = await dial(nodes, IN_A_ID, port, client_ctx(pki, None), NODE_ID.origin_host)
    await wait_for(lambda: any(r.get("last_error") for r in client.peer_states()), 10.0)
    assert not inbound_open(server)


async def test_the_dialler_holds_the_answering_peer_to_its_certificate(nodes, pki) -> None:
    """The other direction: the IN we dial answers CEA as in-a, but its certificate
    (valid, CA-signed, and naming the host we dialled) is another host's."""
    node_cert = pki.issue("node", "eb.node.example", ["eb.node.example"])
    # The certificate names the dialled name "in-a-tls.operator.example" (so the TLS
    # hostname check passes) but not the Origin-Host the CEA claims.
    lying = pki.issue("lying", "in-a-tls.operator.example", ["in-a-tls.operator.example"])
    server = nodes(IN_A_ID, ssl_context=server_ctx(pki, lying))
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, ssl_context=client_ctx(pki, node_cert))
    client.add_peer_group("in", "operator.example", [PeerAddress("127.0.0.1", port, None)])
    ctx = client.client_ssl_context
    assert ctx is not None
    ctx.check_hostname = False  # the name check is the one under test, not TLS's
    await wait_for(
        lambda: any("TLS certificate" in str(r.get("last_error")) for r in client.peer_states()),
        10.0,
    )
    assert not [r for r in client.peer_states() if r["state"] == "Open"]


async def _closed_within(port: int, timeout_s: float, tls: bool = False) -> float:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = loop.time()
    try:
        data = await asyncio.wait_for(reader.read(), timeout_s)  # we send nothing at all
    finally:
        writer.close()
    assert data == b"" or tls
    return loop.time() - started


async def test_a_silent_client_is_dropped_by_the_same_timer_plain_and_tls(nodes, pki) -> None:
    """Finding 3: on TLS a connection that never starts a handshake was held 60 s,
    on plain TCP 10 s (the CER timer). Now one timer governs both."""
    node_cert = pki.issue("node", "eb.node.example", ["eb.node.example"])
    plain = nodes(NODE_ID, capabilities_timeout_s=0.5)
    tls = nodes(NODE_ID, capabilities_timeout_s=0.5, ssl_context=server_ctx(pki, node_cert))
    plain_port = await plain.listen("127.0.0.1", 0)
    tls_port = await tls.listen("127.0.0.1", 0)
    assert await _closed_within(plain_port, 10.0) < 10.0
    assert await _closed_within(tls_port, 10.0, tls=True) < 10.0


async def test_a_silent_tls_client_is_dropped_by_the_default_timer(nodes, pki) -> None:
    node_cert = pki.issue("node", "eb.node.example", ["eb.node.example"])
    tls = nodes(NODE_ID, ssl_context=server_ctx(pki, node_cert))
    port = await tls.listen("127.0.0.1", 0)
    assert await _closed_within(port, 30.0, tls=True) < 30.0  # 10 s, not 60


async def test_connection_bounds_per_client_and_in_all(nodes) -> None:
    """Finding 3: 1,000 connections without CER were accepted. One address now holds at
    most `inbound_per_client_max`, all together `inbound_connections_max`; beyond, a
    connection is closed at once, and another address still gets in."""
    server = nodes(NODE_ID, inbound_per_client_max=3, inbound_connections_max=5)
    port = await server.listen("127.0.0.1", 0)
    held = []
    for _ in range(3):
        held.append(await asyncio.open_connection("127.0.0.1", port))
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5.0) == b""  # over the per-client bound
    writer.close()
    for _ in range(2):
        held.append(await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0)))
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.3", 0))
    assert await asyncio.wait_for(reader.read(), 5.0) == b""  # over the total
    writer.close()
    _, first = held.pop(0)
    first.close()
    await wait_for(lambda: server._inbound_total == 4)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.3", 0))
    await asyncio.sleep(0.2)
    assert not reader.at_eof()  # a slot came free: served
    writer.close()
    for _, w in held:
        w.close()
