"""The private Mosquitto of `extrabalance.mosquitto`, with a pytest skip when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from extrabalance.mosquitto import BrokerUnavailable, MosquittoBroker, find_mosquitto

__all__ = ["BrokerUnavailable", "MosquittoBroker", "find_mosquitto", "start_broker_or_skip"]


def start_broker_or_skip(directory: Path, **kwargs: object) -> MosquittoBroker:
    """Start a private broker, or skip the calling test with the reason."""
    try:
        return MosquittoBroker(directory, **kwargs).start()  # type: ignore[arg-type]
    except BrokerUnavailable as exc:
        pytest.skip(f"no private MQTT broker: {exc}")
