"""The asyncio layer's per-PDU fast paths over 127.0.0.1: handlers that answer
directly (no task), handlers that answer nonsense, the window handed over in FIFO
order, one write per loop turn, and the token bucket that reserves instead of polling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from extrabalance.smpp.aio.client import BindConfig, Esme, _TokenBucket
from extrabalance.smpp.aio.connection import SmppConnection
from extrabalance.smpp.aio.server import Smsc
from extrabalance.smpp.pdu import DeliverSm, Status, SubmitSm
from extrabalance.smpp.ussd import ussd_deliver

CREDS = {"node": "secret"}


def _submit(n: int) -> SubmitSm:
    return SubmitSm(source_addr="1234", destination_addr=f"2010{n:08d}", short_message=b"hi")


class Pair:
    """An Smsc whose on_submit answers directly, and an Esme whose on_deliver does."""

    def __init__(self) -> None:
        self.submits: list[SubmitSm] = []
        self.delivers: list[DeliverSm] = []
        self.deliver_answer: Any = 0
        self.submit_answer: Any = None
        self.smsc = Smsc(credentials=CREDS, on_submit=self.on_submit)
        self.esme: Esme | None = None

    def on_submit(self, pdu: SubmitSm, system_id: str) -> Any:
        self.submits.append(pdu)
        if self.submit_answer is not None:
            return self.submit_answer
        return 0, f"m{len(self.submits)}"

    def on_deliver(self, pdu: DeliverSm, bind: str) -> Any:
        self.delivers.append(pdu)
        return self.deliver_answer

    async def start(self, **bind: Any) -> Esme:
        port = await self.smsc.listen("127.0.0.1", 0)
        self.esme = Esme([BindConfig("127.0.0.1", port, "node", "secret",
                                     response_timeout_s=2.0, **bind)],
                         self.on_deliver, retry_backoff_base_s=0.01, submit_wait_bound_s=2.0)
        await self.esme.start()
        await self.esme.wait_bound(5.0)
        return self.esme


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = Pair()
    yield p
    if p.esme is not None:
        await p.esme.close()
    await p.smsc.close()


def _tasks_now() -> int:
    return len(asyncio.all_tasks())


async def test_direct_answers_both_ways(pair: Pair) -> None:
    esme = await pair.start()
    results = await asyncio.gather(*(esme.submit(_submit(i)) for i in range(50)))
    assert all(r.ok for r in results)
    assert sorted(r.message_id for r in results) == sorted(f"m{i}" for i in range(1, 51))
    status = await pair.smsc.deliver(ussd_deliver("201000000001", "123", "*123#"))
    assert status == 0 and len(pair.delivers) == 1


async def test_direct_answer_makes_no_task(pair: Pair) -> None:
    esme = await pair.start()
    await esme.submit(_submit(0))  # warm: every bind up, nothing pending
    before = _tasks_now()
    created: list[object] = []
    loop = asyncio.get_running_loop()
    factory = loop.get_task_factory()

    def counting(loop_: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        created.append(coro)
        return asyncio.Task(coro, loop=loop_, **kw) if factory is None else factory(loop_, coro, **kw)

    loop.set_task_factory(counting)  # type: ignore[arg-type]
    try:
        assert await pair.smsc.deliver(ussd_deliver("201000000001", "123", "1")) == 0
        result = await esme.submit(_submit(1))
    finally:
        loop.set_task_factory(factory)
    assert result.ok
    # Neither the deliver_sm nor the submit_sm got a task on the answering side.
    assert not [c for c in created if "_answer" in getattr(c, "__qualname__", "")]
    assert _tasks_now() == before


async def test_awaitable_answers_still_work(pair: Pair) -> None:
    async def later() -> tuple[int, str]:
        await asyncio.sleep(0)
        return 0, "late"

    async def deliver_later() -> int:
        await asyncio.sleep(0)
        return int(Status.ESME_RX_T_APPN)

    esme = await pair.start()
    pair.submit_answer = None
    pair.smsc.on_submit = lambda pdu, sid: later()  # type: ignore[assignment,misc]
    assert (await esme.submit(_submit(0))).message_id == "late"
    pair.deliver_answer = None
    esme._on_deliver = lambda pdu, bind: deliver_later()  # type: ignore[assignment,method-assign]
    assert await pair.smsc.deliver(ussd_deliver("201000000001", "123", "1")) == Status.ESME_RX_T_APPN


async def test_nonsense_answers_cost_one_response_not_the_bind(pair: Pair) -> None:
    esme = await pair.start()
    pair.submit_answer = ("not", "a", "pair")  # wrong shape: the handler's bug
    result = await esme.submit(_submit(0))
    assert result.status == Status.ESME_RX_T_APPN
    pair.submit_answer = None
    pair.deliver_answer = None  # not a status
    assert await pair.smsc.deliver(ussd_deliver("201000000001", "123", "1")) == (
        Status.ESME_RX_T_APPN)
    pair.deliver_answer = 0
    assert (await esme.submit(_submit(1))).ok  # the bind is still up
    assert await pair.smsc.deliver(ussd_deliver("201000000001", "123", "2")) == 0


async def test_handler_returning_a_non_pdu_keeps_the_connection(pair: Pair) -> None:
    esme = await pair.start()
    conns = list(pair.smsc._conns)
    assert len(conns) == 1
    conns[0]._on_request = lambda pdu: None  # type: ignore[assignment,return-value]
    result = await esme.submit(_submit(0))
    assert result.status == Status.ESME_RX_T_APPN
    assert not conns[0].closed.is_set()


async def test_window_bounds_and_fifo(pair: Pair) -> None:
    gate = asyncio.Event()
    order: list[str] = []

    async def slow(pdu: SubmitSm, sid: str) -> tuple[int, str]:
        await gate.wait()
        order.append(pdu.destination_addr)
        return 0, pdu.destination_addr

    pair.smsc.on_submit = slow  # type: ignore[assignment]
    esme = await pair.start(window_max=3)
    worker = esme._workers[0]
    assert worker.conn is not None
    conn: SmppConnection = worker.conn
    tasks = [asyncio.create_task(esme.submit(_submit(i))) for i in range(8)]
    for _ in range(50):
        await asyncio.sleep(0.01)
        if conn.slots.waiting == 5:
            break
    assert conn.session.window_used == 3 and conn.slots.waiting == 5
    gate.set()
    results = await asyncio.gather(*tasks)
    assert [r.message_id for r in results] == [f"2010{i:08d}" for i in range(8)]
    assert conn.window_free == 3 and conn.slots.free == 3 and not conn.slots.waiting


async def test_cancelled_waiter_gives_its_slot_back(pair: Pair) -> None:
    gate = asyncio.Event()

    async def slow(pdu: SubmitSm, sid: str) -> tuple[int, str]:
        await gate.wait()
        return 0, "ok"

    pair.smsc.on_submit = slow  # type: ignore[assignment]
    esme = await pair.start(window_max=1)
    conn = esme._workers[0].conn
    assert conn is not None
    first = asyncio.create_task(esme.submit(_submit(0)))
    second = asyncio.create_task(esme.submit(_submit(1)))
    third = asyncio.create_task(esme.submit(_submit(2)))
    await asyncio.sleep(0.05)
    second.cancel()
    gate.set()
    assert (await first).ok and (await third).ok
    assert second.cancelled()
    assert conn.slots.free == 1 and not conn.slots.waiting


async def test_one_write_per_loop_turn(pair: Pair) -> None:
    esme = await pair.start(window_max=20)
    conn = esme._workers[0].conn
    assert conn is not None
    writes: list[int] = []
    transport = conn._transport
    assert transport is not None
    real_write = transport.write

    def counting_write(data: bytes) -> None:
        writes.append(len(data))
        real_write(data)

    transport.write = counting_write  # type: ignore[method-assign]
    results = await asyncio.gather(*(esme.submit(_submit(i)) for i in range(20)))
    assert all(r.ok for r in results)
    # 20 submits started in one turn leave in one write.
    assert len(writes) == 1 and writes[0] > 20 * 16


async def test_token_bucket_reserves_in_order() -> None:
    now = [100.0]
    bucket = _TokenBucket(100.0, lambda: now[0])  # capacity 10
    assert [bucket.reserve_s() for _ in range(10)] == [0.0] * 10
    waits = [bucket.reserve_s() for _ in range(3)]
    assert waits == pytest.approx([0.01, 0.02, 0.03])
    now[0] += 0.03  # the three reserved tokens are due: nothing left over
    assert bucket.reserve_s() == pytest.approx(0.01)
    now[0] += 10.0  # idle long: back to a full burst, not more
    assert [bucket.reserve_s() for _ in range(10)] == [0.0] * 10
    assert bucket.reserve_s() > 0
