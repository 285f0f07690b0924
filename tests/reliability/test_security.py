"""Security defaults, each checked against the real thing where one exists.

Diameter peer allow-list and TLS, SMPP bind credentials, MQTT credentials and TLS
options, secrets only from the environment or files, MSISDN masking in logs, and the
refusal of a public Diameter listener without TLS.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.fuzz_peers import DiameterConn
from extrabalance.config import ConfigError, load_settings
from extrabalance.diameter import codec, gy
from extrabalance.diameter.aio.node import DiameterNode, PeerAddress
from extrabalance.diameter.peer import LocalIdentity
from extrabalance.observability import configure_logging, mask_msisdn

IN_A = "in-a.operator.example"


def override(**sections: Any) -> dict[str, Any]:
    return sections


# --- Diameter: allow-list on the real node --------------------------------------------


async def test_unknown_origin_host_gets_cea_3010_and_is_disconnected(tmp_path: Path) -> None:
    from extrabalance.demo import demo_env

    async with demo_env(tmp_path) as env:
        port = env.settings.diameter.listen_port
        rogue = DiameterConn("127.0.0.1", port, "rogue.example", "example")
        cea = await rogue.open()
        assert cea is not None and cea.result_code == 3010 and cea.error_bit
        assert await rogue.wait_closed(5.0)
        await rogue.close()
        # the configured IN is still served
        code, _ = await env.in_sim.send_out_of_balance("201001234567")
        assert code == 4012


# --- MSISDN masking (a demo run's logs) -----------------------------------------------


@pytest.mark.parametrize("masked", [True, False])
async def test_msisdn_masked_in_logs_unless_turned_off(tmp_path: Path, masked: bool) -> None:
    from extrabalance.demo import B, demo_env

    out = io.StringIO()
    configure_logging(mask_msisdn_in_logs=masked, level="DEBUG", stream=out)
    try:
        async with demo_env(tmp_path) as env:
            phone = env.smsc.handset(B)
            await phone.send_sms("HELP")
            await phone.next_sms(5.0)
    finally:
        configure_logging(level="WARNING")
    logs = out.getvalue()
    assert "sms_received" in logs
    if masked:
        assert B not in logs
        assert mask_msisdn(B) in logs
    else:
        assert B in logs


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("section,extra", [
    ("mqtt", {"password": "hunter2"}),
    ("admin", {"token": "t0ken"}),
])
def test_a_literal_secret_in_the_config_is_rejected(section: str, extra: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(overrides={section: extra})
    assert section in str(err.value)


def test_a_literal_smpp_password_is_rejected() -> None:
    bind = {"system_id": "eb", "password": "secret"}
    with pytest.raises(ConfigError) as err:
        load_settings(overrides={"smpp": {"binds": [bind]}})
    assert "password" in str(err.value)


def test_secrets_come_from_env_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EB_TEST_MQTT_PW", "from-env")
    secret = tmp_path / "smpp.pw"
    secret.write_text("fromfile\n")
    s = load_settings(overrides={
        "mqtt": {"username": "eb", "password_env": "EB_TEST_MQTT_PW"},
        "smpp": {"binds": [{"system_id": "eb", "password_file": str(secret)}]},
    })
    assert s.mqtt.password() == "from-env"
    assert s.smpp.binds[0].password() == "fromfile"


def test_public_diameter_listener_without_tls_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(overrides={"diameter": {"listen_host": "0.0.0.0"}})
    assert "allow_unauthenticated_public_listener" in str(err.value)
    allowed = load_settings(overrides={"diameter": {
        "listen_host": "0.0.0.0", "allow_unauthenticated_public_listener": True}})
    assert allowed.diameter.listen_host == "0.0.0.0"
    # TLS that authenticates nobody is no better off loopback (issue 22): a CA is needed.
    tls = {"listen_host": "0.0.0.0", "tls_cert_file": "c.pem", "tls_key_file": "k.pem"}
    with pytest.raises(ConfigError, match="tls_ca_file"):
        load_settings(overrides={"diameter": tls})
    with_tls = load_settings(overrides={"diameter": {**tls, "tls_ca_file": "ca.pem"}})
    assert with_tls.diameter.tls_cert_file == "c.pem"


# --- Diameter over TLS -------------------------------------------------------------------


def self_signed(tmp_path: Path, host: str) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not installed: cannot make a test certificate")
    cert, key = tmp_path / f"{host}.pem", tmp_path / f"{host}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={host}", "-addext", f"subjectAltName=DNS:{host}",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


async def test_node_listener_and_an_in_peer_talk_over_tls(tmp_path: Path) -> None:
    from extrabalance.node import Node

    base = load_settings()
    node_host = base.node.origin_host
    cert, key = self_signed(tmp_path, node_host)
    settings = load_settings(overrides={
        "storage": {"path": str(tmp_path / "eb.db")},
        "diameter": {"tls_cert_file": str(cert), "tls_key_file": str(key)},
    })
    node = Node(settings, edr_dir=tmp_path / "edr")
    assert node.diameter.ssl_context is not None
    port = await node.diameter.listen("127.0.0.1", 0)

    async def unused(msg: codec.Message, peer: str) -> codec.Message:
        raise AssertionError("no requests to the IN here")

    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    in_side = DiameterNode(LocalIdentity(IN_A, "operator.example"),
                           allowed_peers={node_host}, request_handler=unused,
                           ssl_context=client_ctx)
    try:
        in_side.add_peer_group("node", "operator.example",
                               [PeerAddress("127.0.0.1", port, node_host)])
        await in_side.wait_ready("node", 5)
        answer = await in_side.request("node", gy.build_ccr(gy.CreditControlRequest(
            session_id=f"{IN_A};tls;1", origin_host=IN_A, origin_realm="operator.example",
            destination_realm="operator.example", msisdn="201001234567")))
        assert answer.get(268) == 4012  # the real Gy server answered, over TLS
        # a plain TCP peer cannot even get a CEA from the TLS listener
        plain = DiameterConn("127.0.0.1", port, IN_A, "operator.example")
        try:
            cea = await asyncio.wait_for(plain.open(), 6)
        except (TimeoutError, ConnectionError):
            cea = None
        assert cea is None
        await plain.close()
    finally:
        await in_side.close()
        await node.diameter.close()
        await node.ledger.close()


async def test_node_dials_its_in_over_tls_and_checks_the_in_certificate(tmp_path: Path) -> None:
    """Node → IN: the node dials the IN with a client context, verifies the IN's
    certificate against the configured CA, and presents its own (mutual TLS)."""
    from extrabalance.node import Node

    base = load_settings()
    node_host = base.node.origin_host
    node_cert, node_key = self_signed(tmp_path, node_host)
    in_cert, in_key = self_signed(tmp_path, IN_A)
    ca = tmp_path / "ca.pem"  # both self-signed certificates are the trust anchors
    ca.write_text(node_cert.read_text() + in_cert.read_text())

    in_server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    in_server.load_cert_chain(str(in_cert), str(in_key))
    in_server.verify_mode = ssl.CERT_REQUIRED  # the IN insists on the node's certificate

    async def refund(msg: codec.Message, peer: str) -> codec.Message:
        return gy.build_cca(msg, IN_A, "operator.example", 2001,
                            currency_numeric=818, currency_exponent=2)

    in_side = DiameterNode(LocalIdentity(IN_A, "operator.example"),
                           allowed_peers={node_host}, request_handler=refund,
                           ssl_context=in_server)
    in_port = await in_side.listen("127.0.0.1", 0)
    settings = load_settings(overrides={
        "storage": {"path": str(tmp_path / "eb.db")},
        "diameter": {"tls_cert_file": str(node_cert), "tls_key_file": str(node_key),
                     "tls_ca_file": str(ca)},
        "in_nodes": [{"name": "in-a", "origin_host": IN_A, "realm": "operator.example",
                      "peers": [{"host": "127.0.0.1", "port": in_port}],
                      "ranges": [{"prefix": "2010"}]}],
    })
    node = Node(settings, edr_dir=tmp_path / "edr")
    try:
        node.diameter.add_peer_group(IN_A, "operator.example", [PeerAddress("127.0.0.1", in_port, IN_A)])
        await node.diameter.wait_ready(IN_A, 5)
        from extrabalance.service.ports import InAction, InOperation, InOutcome

        result = await node.in_port.execute(InOperation(
            InAction.REFUND_ACCOUNT, "201001234567", IN_A, 100, node.in_port.new_session_id()))
        assert result.outcome is InOutcome.DONE
    finally:
        await node.diameter.close()
        await in_side.close()
        await node.ledger.close()


# --- SMPP bind credentials ---------------------------------------------------------------


async def test_smsc_refuses_a_wrong_password_and_the_esme_retries_with_backoff() -> None:
    from extrabalance.smpp.aio.client import BindConfig, Esme, NotBoundError
    from extrabalance.smpp.pdu import Status
    from simulators.smsc import SmscSimulator

    smsc = SmscSimulator(system_id="extrabalance", password="right1")
    port = await smsc.start()

    async def on_deliver(pdu: Any, bind: str) -> int:
        return 0

    esme = Esme([BindConfig("127.0.0.1", port, "extrabalance", "wrong1")], on_deliver)
    await esme.start()
    try:
        with pytest.raises(NotBoundError) as err:
            await esme.wait_bound(1.5)
        assert err.value.status == Status.ESME_RINVPASWD
        [state] = esme.bind_states()
        assert state["bound"] is False
        assert state["last_bind_status"] == Status.ESME_RINVPASWD
        assert "ESME_RINVPASWD" in str(state["last_error"])
        # it keeps trying, but backs off: a handful of attempts, not a tight loop
        assert 2 <= int(state["connects"]) <= 10
        assert esme._workers[0].task is not None and not esme._workers[0].task.done()
    finally:
        await esme.close()
        await smsc.close()


# --- MQTT credentials and TLS options ------------------------------------------------------


async def test_mqtt_username_and_password_reach_the_broker(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from extrabalance.mosquitto import BrokerUnavailable, MosquittoBroker
    from extrabalance.recharge.listener import MqttSettings, RechargeListener

    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed: no private broker with a password file")
    pwfile = tmp_path / "passwd"
    password = os.urandom(6).hex()
    _password_file(tool, pwfile, "eb-node", password)
    try:
        broker = MosquittoBroker(tmp_path / "mq", extra_config=(
            "allow_anonymous false", f"password_file {pwfile}")).start()
    except BrokerUnavailable as exc:
        pytest.skip(str(exc))
    # the config's username and password_env are what the node hands the client
    monkeypatch.setenv("EB_TEST_MQTT_PASSWORD", password)
    settings = load_settings(overrides={"mqtt": {
        "port": broker.port, "username": "eb-node", "password_env": "EB_TEST_MQTT_PASSWORD"}})
    try:
        async def handle(event: Any) -> None:
            return None

        async def connected(pw: str | None) -> bool:
            listener = RechargeListener(MqttSettings(
                host="127.0.0.1", port=broker.port, client_id=f"eb-sec-{pw}",
                username=settings.mqtt.username, password=pw,
                reconnect_backoff_initial_s=0.1, reconnect_backoff_max_s=0.2,
                connect_timeout_s=2), handle, expected_currency="EGP")
            task = asyncio.create_task(listener.run())
            try:
                for _ in range(40):
                    if listener.stats()["connected"]:
                        return True
                    await asyncio.sleep(0.05)
                return False
            finally:
                await listener.stop()
                await asyncio.wait_for(task, 5)

        assert await connected(settings.mqtt.password())
        assert not await connected("wrong")
        assert not await connected(None)
    finally:
        broker.stop()


def _password_file(tool: str, path: Path, user: str, password: str) -> None:
    subprocess.run([tool, "-b", "-c", str(path), user, password], check=True,
                   capture_output=True)


async def test_mqtt_tls_option_builds_a_tls_client(tmp_path: Path) -> None:
    from extrabalance.recharge.listener import MqttSettings, RechargeListener, _paho_of

    async def handle(event: Any) -> None:
        return None

    with_tls = RechargeListener(MqttSettings(tls=True), handle, expected_currency="EGP")
    without = RechargeListener(MqttSettings(), handle, expected_currency="EGP")
    assert _paho_of(with_tls._client())._ssl_context is not None
    assert _paho_of(without._client())._ssl_context is None


async def test_node_hands_mqtt_credentials_and_tls_from_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from extrabalance.node import Node

    monkeypatch.setenv("EB_TEST_MQTT_PASSWORD", "pw-from-env")
    settings = load_settings(overrides={
        "storage": {"path": str(tmp_path / "eb.db")},
        "mqtt": {"username": "eb-node", "password_env": "EB_TEST_MQTT_PASSWORD", "tls": True,
                 "ca_file": "/nonexistent/ca.pem"}})
    node = Node(settings, edr_dir=tmp_path / "edr")
    try:
        mqtt = node.recharges._settings
        assert (mqtt.username, mqtt.password, mqtt.tls, mqtt.ca_file) == (
            "eb-node", "pw-from-env", True, "/nonexistent/ca.pem")
    finally:
        await node.ledger.close()
