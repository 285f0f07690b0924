"""A gateway that answers submit_sm after the node's response timeout: the window is
still honoured (a timed-out request keeps its slot until its late answer), the
timeout is not followed by blind re-sends, and a message no longer wanted is never
sent again."""

from __future__ import annotations

import asyncio

import pytest

from extrabalance.smpp.aio.client import BindConfig, Esme, SubmitError
from extrabalance.smpp.aio.server import Smsc
from extrabalance.smpp.pdu import SubmitSm


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def wait_for(predicate, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_late_submit_resp_keeps_its_window_slot_and_is_not_resent():
    clock = Clock()
    gates: list[asyncio.Event] = []
    unanswered = [0]
    most_unanswered = [0]

    async def on_submit(pdu, system_id):
        gate = asyncio.Event()
        gates.append(gate)
        unanswered[0] += 1
        most_unanswered[0] = max(most_unanswered[0], unanswered[0])
        await gate.wait()  # the gateway answers when the test says so
        unanswered[0] -= 1
        return 0, f"m{len(gates)}"

    smsc = Smsc(credentials={"node": "pw"}, on_submit=on_submit)
    port = await smsc.listen("127.0.0.1", 0)
    esme = Esme([BindConfig("127.0.0.1", port, "node", "pw", window_max=2,
                            response_timeout_s=5.0, enquire_link_s=3600)],
                lambda pdu, bind: 0, clock=clock, retry_backoff_base_s=0.01)
    await esme.start()
    try:
        await esme.wait_bound(5.0)
        first = [asyncio.create_task(esme.submit(SubmitSm(destination_addr=f"2010{i}")))
                 for i in range(2)]
        await wait_for(lambda: len(gates) == 2)
        clock.now += 6.0  # past the response timeout
        for task in first:
            with pytest.raises(SubmitError):
                async with asyncio.timeout(10):
                    await task
        assert len(gates) == 2  # a timeout is not followed by a blind re-send
        third = asyncio.create_task(esme.submit(SubmitSm(destination_addr="20109")))
        await asyncio.sleep(0.3)
        assert len(gates) == 2  # both slots still held by the unanswered requests
        gates[0].set()  # the late answer frees one slot
        await wait_for(lambda: len(gates) == 3)
        gates[1].set()
        gates[2].set()
        async with asyncio.timeout(10):
            assert (await third).ok
        assert most_unanswered[0] <= 2
        conn = esme._workers[0].conn
        assert conn is not None and conn.stats["late_responses"] == 2
        assert esme.stats["timeout_given_up"] == 2 and esme.stats["timeout_resends"] == 0
    finally:
        for gate in gates:
            gate.set()
        await esme.close()
        await smsc.close()


async def test_a_submit_no_longer_wanted_is_not_sent_again():
    smsc = Smsc(credentials={"node": "pw"}, on_submit=lambda pdu, system_id: (0, "m"))
    smsc.set_throttle(1.0)  # every submit_sm: ESME_RTHROTTLED
    port = await smsc.listen("127.0.0.1", 0)
    esme = Esme([BindConfig("127.0.0.1", port, "node", "pw")], lambda pdu, bind: 0,
                retry_backoff_base_s=0.01)
    await esme.start()
    try:
        await esme.wait_bound(5.0)
        with pytest.raises(SubmitError, match="superseded"):
            await esme.submit(SubmitSm(destination_addr="20101"), resend_if=lambda: False)
        assert smsc.submits_received == 1
    finally:
        await esme.close()
        await smsc.close()


async def test_connect_failures_and_an_unset_password_are_named(caplog):
    import logging
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    esme = Esme([BindConfig("127.0.0.1", dead_port, "node", "pw",
                            reconnect_backoff_max_s=0.05)], lambda pdu, bind: 0)
    with caplog.at_level(logging.WARNING, logger="extrabalance.smpp.aio.client"):
        await esme.start()
        try:
            await wait_for(lambda: esme.bind_states()[0]["connect_failures"] >= 3)
        finally:
            await esme.close()
    lines = [r.getMessage() for r in caplog.records if "connect failed" in r.getMessage()]
    assert lines and f"127.0.0.1:{dead_port}" in lines[0] and "node@" in lines[0]
    assert len(lines) < esme.bind_states()[0]["connect_failures"] + 1  # rate-limited

    smsc = Smsc(credentials={"node": "pw"}, on_submit=lambda pdu, system_id: (0, "m"))
    port = await smsc.listen("127.0.0.1", 0)
    esme = Esme([BindConfig("127.0.0.1", port, "node", "",
                            password_source="environment variable EB_SMPP_PASSWORD, "
                                            "which is not set",
                            reconnect_backoff_max_s=0.05)], lambda pdu, bind: 0)
    await esme.start()
    try:
        await wait_for(lambda: esme.bind_states()[0]["last_bind_status"] is not None)
        error = str(esme.bind_states()[0]["last_error"])
        assert "ESME_RINVPASWD" in error and "EB_SMPP_PASSWORD, which is not set" in error
    finally:
        await esme.close()
        await smsc.close()


async def test_a_caller_cancelled_before_the_timeout_gives_its_slot_back_once():
    clock = Clock()
    gates: list[asyncio.Event] = []

    async def on_submit(pdu, system_id):
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()
        return 0, "m"

    smsc = Smsc(credentials={"node": "pw"}, on_submit=on_submit)
    port = await smsc.listen("127.0.0.1", 0)
    esme = Esme([BindConfig("127.0.0.1", port, "node", "pw", window_max=1,
                            response_timeout_s=5.0, enquire_link_s=3600)],
                lambda pdu, bind: 0, clock=clock)
    await esme.start()
    try:
        await esme.wait_bound(5.0)
        gone = asyncio.create_task(esme.submit(SubmitSm(destination_addr="20101")))
        await wait_for(lambda: len(gates) == 1)
        gone.cancel()  # e.g. a graceful stop gave up on it
        await asyncio.gather(gone, return_exceptions=True)
        clock.now += 6.0  # its timeout passes afterwards, then the late answer comes
        await asyncio.sleep(0.5)
        gates[0].set()
        await asyncio.sleep(0.3)
        conn = esme._workers[0].conn
        assert conn is not None and conn.slots.free == 1  # never more than the window
    finally:
        for gate in gates:
            gate.set()
        await esme.close()
        await smsc.close()
