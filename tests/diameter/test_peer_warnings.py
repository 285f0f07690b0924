"""Warnings that name the peer: a CEA 3010, an unexpected Origin-Host (in a CEA or an
answer), a CER from an unknown peer and late answers are logged once per peer per
streak, with what to check, and counted for the metric."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from extrabalance.diameter import gy
from extrabalance.diameter.aio.node import (
    WARNING_HINTS,
    DiameterNode,
    LocalIdentity,
    PeerAddress,
    PeerWarnings,
    RequestTimeout,
)
from extrabalance.diameter.codec import Message

from .helpers import sample_ccr
from .test_node import IN_A_ID, NODE_ID, nodes, wait_for  # noqa: F401 - the fixture

LOGGER = "extrabalance.diameter.aio.node"


def warnings_logged(caplog: pytest.LogCaptureFixture, kind: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
            and getattr(r, "kind", None) == kind]


async def test_cea_3010_is_one_warning_per_streak_naming_the_peer(
        nodes: Callable[..., DiameterNode],  # noqa: F811 - the imported fixture
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server = nodes(IN_A_ID, allowed={"someone-else.example"})
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed=None, reconnect_min_s=0.01, reconnect_max_s=0.02)
    client.add_peer_group("in-a", "operator.example",
                          [PeerAddress("127.0.0.1", port, IN_A_ID.origin_host)])
    key = (IN_A_ID.origin_host, "cea_unknown_peer")
    await wait_for(lambda: client.peer_warnings().get(key, 0) >= 3)
    [record] = warnings_logged(caplog, "cea_unknown_peer")
    text = record.getMessage()
    assert record.peer == IN_A_ID.origin_host and IN_A_ID.origin_host in text  # type: ignore[attr-defined]
    assert "3010" in text and WARNING_HINTS["cea_unknown_peer"] in text
    # the IN is told about us: the streak ends when it opens; a new refusal warns again
    server.allowed_peers = frozenset({NODE_ID.origin_host})
    await client.wait_ready("in-a", 5.0)
    assert any("cea_unknown_peer over after" in r.getMessage() for r in caplog.records)
    # The server saw the same streak from its side: one warning for the unknown CER.
    [seen] = warnings_logged(caplog, "cer_unknown_peer")
    assert NODE_ID.origin_host in seen.getMessage()
    assert server.peer_warnings()[(NODE_ID.origin_host, "cer_unknown_peer")] >= 3


async def test_unexpected_origin_host_in_the_cea_is_one_warning_naming_both(
        nodes: Callable[..., DiameterNode],  # noqa: F811 - the imported fixture
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    server = nodes(IN_A_ID, allowed=None)
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed=None, reconnect_min_s=0.01, reconnect_max_s=0.02)
    client.add_peer_group("in-x", "operator.example",
                          [PeerAddress("127.0.0.1", port, "in-x.operator.example")])
    key = ("in-x.operator.example", "unexpected_origin_host")
    await wait_for(lambda: client.peer_warnings().get(key, 0) >= 3)
    [record] = warnings_logged(caplog, "unexpected_origin_host")
    assert "in-x.operator.example" in record.getMessage()
    assert IN_A_ID.origin_host in record.getMessage()
    assert WARNING_HINTS["unexpected_origin_host"] in record.getMessage()


class Gate:
    """A handler that answers only once released (so its answers are late for sure)."""

    def __init__(self, origin_host: str) -> None:
        self.origin_host = origin_host
        self.open = asyncio.Event()
        self.open.set()

    async def __call__(self, msg: Message, peer: str) -> Message:
        await self.open.wait()
        return gy.build_cca(msg, self.origin_host, "operator.example", 2001, granted_minor=1,
                            currency_numeric=818, currency_exponent=2)


async def test_late_answers_are_one_warning_per_streak(
        nodes: Callable[..., DiameterNode],  # noqa: F811 - the imported fixture
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PeerWarnings, "STREAK_END_ANSWERS", 3)
    caplog.set_level(logging.INFO, LOGGER)
    gate = Gate(IN_A_ID.origin_host)
    server = nodes(IN_A_ID, gate, allowed=None)
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed=None)
    client.add_peer_group("in-a", "operator.example",
                          [PeerAddress("127.0.0.1", port, IN_A_ID.origin_host)])
    await client.wait_ready("in-a", 5.0)
    key = (IN_A_ID.origin_host, "late_answer")

    async def late_ones(n: int) -> None:
        gate.open.clear()
        for outcome in await asyncio.gather(
                *[client.request("in-a", sample_ccr(), timeout_ms=50) for _ in range(n)],
                return_exceptions=True):
            assert isinstance(outcome, RequestTimeout)
        gate.open.set()

    await late_ones(3)
    await wait_for(lambda: client.peer_warnings().get(key, 0) == 3)
    [record] = warnings_logged(caplog, "late_answer")
    assert IN_A_ID.origin_host in record.getMessage()
    assert WARNING_HINTS["late_answer"] in record.getMessage()
    # Answers in time, but fewer than the streak's end: more late ones stay one warning.
    for _ in range(2):
        await client.request("in-a", sample_ccr(), timeout_ms=10_000)
    await late_ones(1)
    await wait_for(lambda: client.peer_warnings().get(key, 0) == 4)
    assert len(warnings_logged(caplog, "late_answer")) == 1
    # Enough answers in time end the streak; the next late answer is a new warning.
    for _ in range(3):
        await client.request("in-a", sample_ccr(), timeout_ms=10_000)
    assert any("late_answer over after 4" in r.getMessage() for r in caplog.records)
    await late_ones(1)
    await wait_for(lambda: client.peer_warnings().get(key, 0) == 5)
    assert len(warnings_logged(caplog, "late_answer")) == 2


async def test_answer_from_another_origin_host_is_one_warning(
        nodes: Callable[..., DiameterNode],  # noqa: F811 - the imported fixture
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    server = nodes(IN_A_ID, Gate("in-z.operator.example"), allowed=None)
    port = await server.listen("127.0.0.1", 0)
    client = nodes(NODE_ID, allowed=None)
    client.add_peer_group("in-a", "operator.example",
                          [PeerAddress("127.0.0.1", port, IN_A_ID.origin_host)])
    await client.wait_ready("in-a", 5.0)
    for _ in range(3):
        answer = await client.request("in-a", sample_ccr(), timeout_ms=10_000)
        assert gy.parse_cca(answer).result_code == 2001  # used all the same
    assert client.peer_warnings()[(IN_A_ID.origin_host, "unexpected_origin_host")] == 3
    [record] = warnings_logged(caplog, "unexpected_origin_host")
    assert "in-z.operator.example" in record.getMessage()


def test_unknown_peers_naming_themselves_cannot_grow_the_counts_without_bound() -> None:
    warnings = PeerWarnings()
    for i in range(PeerWarnings.KEYS_MAX + 50):
        warnings.warn(f"stranger-{i}.example", "cer_unknown_peer", "CER")
    assert len(warnings.counts) == PeerWarnings.KEYS_MAX + 1
    assert warnings.counts[(PeerWarnings.OTHER_PEERS, "cer_unknown_peer")] == 50


def test_every_kind_has_a_hint() -> None:
    assert set(WARNING_HINTS) == {"cea_unknown_peer", "unexpected_origin_host",
                                  "cer_unknown_peer", "late_answer"}
    assert LocalIdentity  # imported for the fixture's type
