"""Fixtures for the recharge tests: a private Mosquitto per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mqtt_broker import MosquittoBroker, start_broker_or_skip


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private broker on a free 127.0.0.1 port, killed after the test."""
    started = start_broker_or_skip(tmp_path / "broker")
    try:
        yield started
    finally:
        started.kill()
