"""The listener over TLS with a username and password, against a private Mosquitto."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from extrabalance.recharge.events import RechargeEvent, to_payload
from extrabalance.recharge.listener import RechargeListener
from tests.mqtt_broker import MosquittoBroker, start_broker_or_skip
from tests.recharge.support import fast_settings, make_event, running, wait_until


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
         "-keyout", ca_key, "-out", ca_crt],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", key, "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
         "-days", "1", "-extfile", ext, "-out", crt],
    ]  # fmt: skip
    for step in steps:
        subprocess.run([openssl, *map(str, step)], check=True, capture_output=True)
    return ca_crt, crt, key


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    ca_crt, crt, key = make_certificates(tmp_path)
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    password_file = tmp_path / "passwords"
    password_file.touch()
    try:
        subprocess.run(
            [passwd, "-b", str(password_file), "node-1", "s3cret"], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"mosquitto_passwd unavailable: {exc}")
    broker = start_broker_or_skip(
        tmp_path / "broker",
        extra_config=(
            f"cafile {ca_crt}",
            f"certfile {crt}",
            f"keyfile {key}",
            f"password_file {password_file}",
            "allow_anonymous false",
        ),
    )
    try:
        yield broker
    finally:
        broker.kill()


async def test_tls_with_credentials(tls_broker: MosquittoBroker, tmp_path: Path) -> None:
    handled: list[str] = []

    async def handle(event: RechargeEvent) -> None:
        handled.append(event.event_id)

    settings = fast_settings(
        tls_broker,
        tls=True,
        ca_file=str(tmp_path / "ca.crt"),
        username="node-1",
        password="s3cret",
    )
    listener = RechargeListener(settings, handle, expected_currency="EGP")
    async with running(listener):
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        async with aiomqtt.Client(
            tls_broker.host,
            tls_broker.port,
            username="node-1",
            password="s3cret",
            tls_context=context,
        ) as publisher:
            await publisher.publish("extrabalance/recharge/in-a", to_payload(make_event(1)), qos=1)
        await wait_until(lambda: listener.stats()["acked"] == 1, "acked over TLS")
    assert handled == [make_event(1).event_id]


async def test_wrong_password_keeps_retrying_without_crashing(
    tls_broker: MosquittoBroker, tmp_path: Path
) -> None:
    async def handle(event: RechargeEvent) -> None:
        raise AssertionError("nothing can arrive without a session")

    settings = fast_settings(
        tls_broker, tls=True, ca_file=str(tmp_path / "ca.crt"), username="node-1", password="no"
    )
    listener = RechargeListener(settings, handle, expected_currency="EGP")
    task = asyncio.create_task(listener.run())
    try:
        await wait_until(lambda: listener.stats()["reconnects"] >= 2, "refused twice")
        assert listener.stats()["connected"] is False
        assert not task.done()
    finally:
        await listener.stop()
        await asyncio.wait_for(task, 10)
