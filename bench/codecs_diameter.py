"""Diameter codec and round-trip benchmark: ours against python-diameter, same run.

``run(seconds)`` builds, encodes and decodes the node's CCR-Event REFUND_ACCOUNT
(docs/protocols.md) with both libraries and reports messages per second and the ratio.
``run_roundtrips(seconds)`` measures pipelined CCR/CCA round trips between two
DiameterNodes over one loopback connection.

    python -m bench.codecs_diameter            # JSON on stdout
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from extrabalance.diameter import codec, gy

MSISDN = "201001234567"
AMOUNT_MINOR = 1000
CURRENCY_NUMERIC = 818  # EGP
CURRENCY_EXPONENT = 2
EVENT_NTP_S = 3_973_000_000


def _ours_once(i: int) -> Any:
    msg = gy.build_ccr(
        gy.CreditControlRequest(
            session_id=f"eb.node.example;1700000000;{i}",
            origin_host="eb.node.example",
            origin_realm="node.example",
            destination_realm="operator.example",
            destination_host="in-a.operator.example",
            request_type=gy.EVENT_REQUEST,
            request_number=0,
            msisdn=MSISDN,
            service_context_id="extrabalance@3gpp.org",
            requested_action=gy.REFUND_ACCOUNT,
            requested_minor=AMOUNT_MINOR,
            currency_numeric=CURRENCY_NUMERIC,
            event_timestamp=EVENT_NTP_S,
        ),
        currency_exponent=CURRENCY_EXPONENT,
    )
    decoded = codec.decode(codec.encode(msg))
    # Read what a receiver reads, as the python-diameter loop does.
    return decoded.session_id, decoded.path_value(437, 413, 445, 447)


def _python_diameter_once_factory() -> Callable[[int], Any]:
    import datetime

    from diameter.message import Message
    from diameter.message.avp.grouped import (
        CcMoney,
        RequestedServiceUnit,
        SubscriptionId,
        UnitValue,
    )
    from diameter.message.commands.credit_control import CreditControlRequest

    stamp = datetime.datetime(2025, 11, 25, 10, 15, tzinfo=datetime.UTC)

    def once(i: int) -> Any:
        ccr = CreditControlRequest()
        ccr.session_id = f"eb.node.example;1700000000;{i}"
        ccr.origin_host = b"eb.node.example"
        ccr.origin_realm = b"node.example"
        ccr.destination_host = b"in-a.operator.example"
        ccr.destination_realm = b"operator.example"
        ccr.auth_application_id = 4
        ccr.service_context_id = "extrabalance@3gpp.org"
        ccr.cc_request_type = 4
        ccr.cc_request_number = 0
        ccr.event_timestamp = stamp
        ccr.subscription_id = [SubscriptionId(0, MSISDN)]
        ccr.requested_action = 1
        ccr.requested_service_unit = RequestedServiceUnit(
            cc_money=CcMoney(UnitValue(AMOUNT_MINOR, -CURRENCY_EXPONENT), CURRENCY_NUMERIC)
        )
        decoded = Message.from_bytes(ccr.as_bytes())
        return decoded.session_id, decoded.requested_service_unit.cc_money.unit_value.value_digits

    return once


def _count_for(fn: Callable[[int], Any], seconds: float, start: int) -> tuple[int, float]:
    """Calls of ``fn`` in about ``seconds`` of this thread's CPU time, and that time.

    CPU time, not wall time: on a shared machine a slice may wait for a core, and
    that wait says nothing about either codec. Session-Ids keep changing (``start``
    carries the counter across slices) so no slice sees a message twice.
    """
    count = 0
    batch = 100
    clock = time.thread_time
    started = clock()
    deadline = started + seconds
    first = start
    while True:
        for i in range(first, first + batch):
            fn(i)
        first += batch
        count += batch
        now = clock()
        if now >= deadline:
            return count, now - started


# The two libraries run in alternating slices so that a change of machine load
# (shared CI runners, laptops) falls on both alike and the ratio stays honest.
SLICES: int = 20


def run(seconds: float = 2.0) -> dict[str, float]:
    """Codec throughput, ours and python-diameter's, for the same CCR (per CPU second).

    Both sides do the same work per message: build the CCR from its fields, encode
    it, decode the bytes back into a message object, and read Session-Id and
    Value-Digits from the result. python-diameter decodes every AVP it knows while
    building its message object (its attribute assignment reads each value), so
    neither side skips decoding.
    """
    theirs_once = _python_diameter_once_factory()
    _ours_once(0)  # warm up (imports, caches)
    theirs_once(0)
    ours_n = theirs_n = 0
    ours_s = theirs_s = 0.0
    for _ in range(SLICES):
        n, t = _count_for(_ours_once, seconds / SLICES, ours_n)
        ours_n, ours_s = ours_n + n, ours_s + t
        n, t = _count_for(theirs_once, seconds / SLICES, theirs_n)
        theirs_n, theirs_s = theirs_n + n, theirs_s + t
    ours, theirs = ours_n / ours_s, theirs_n / theirs_s
    return {
        "diameter_ours_per_s": round(ours),
        "diameter_python_diameter_per_s": round(theirs),
        "diameter_ratio": round(ours / theirs, 1),
    }


async def run_roundtrips(seconds: float = 2.0, window: int = 256) -> dict[str, float]:
    """Pipelined CCR/CCA round trips per second over one loopback connection."""
    from extrabalance.diameter.aio.node import DiameterNode, LocalIdentity, PeerAddress

    async def handler(msg: codec.Message, peer: str) -> codec.Message:
        return gy.build_cca(msg, origin_host="in.bench", origin_realm="bench",
                            result_code=2001, currency_numeric=CURRENCY_NUMERIC,
                            currency_exponent=CURRENCY_EXPONENT)

    server = DiameterNode(LocalIdentity("in.bench", "bench", origin_state_id=1),
                          allowed_peers={"eb.bench"}, request_handler=handler)
    client = DiameterNode(LocalIdentity("eb.bench", "bench", origin_state_id=1),
                          allowed_peers={"in.bench"}, request_handler=handler,
                          pending_max=window * 2)
    try:
        port = await server.listen("127.0.0.1", 0)
        client.add_peer_group("in", "bench", [PeerAddress("127.0.0.1", port, "in.bench")])
        await client.wait_ready("in", 5.0)
        session = gy.SessionIdGenerator("eb.bench")
        ccr = gy.CreditControlRequest(
            session_id=session.next(), origin_host="eb.bench", origin_realm="bench",
            destination_realm="bench", destination_host="in.bench",
            request_type=gy.EVENT_REQUEST, request_number=0, msisdn=MSISDN,
            service_context_id="extrabalance@3gpp.org", requested_action=gy.REFUND_ACCOUNT,
            requested_minor=AMOUNT_MINOR, currency_numeric=CURRENCY_NUMERIC,
        )
        msg = gy.build_ccr(ccr, currency_exponent=CURRENCY_EXPONENT)
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await client.request("in", msg)
                done += 1

        started = time.perf_counter()
        cpu_started = time.process_time()
        await asyncio.gather(*(worker() for _ in range(window)))
        elapsed = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
        return {
            "diameter_pipelined_rtt_per_s": round(done / elapsed),
            # Both nodes share this process: round trips per second of its CPU, what
            # one free core would give; the wall-clock figure follows the machine.
            "diameter_pipelined_rtt_per_cpu_s": round(done / cpu_s) if cpu_s else 0,
        }
    finally:
        await client.close()
        await server.close()


def main() -> None:
    result: dict[str, float] = dict(run())
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover - platforms without uvloop
        runner = asyncio.run
    result.update(runner(run_roundtrips()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
