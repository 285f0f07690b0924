"""Esme <-> Smsc over 127.0.0.1: bind, USSD both ways, window, throttling, refusals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from extrabalance.smpp.aio.client import BindConfig, Esme, NotBoundError, SubmitError
from extrabalance.smpp.aio.server import Smsc
from extrabalance.smpp.pdu import DeliverSm, ItsSessionInfo, Status, SubmitSm, UssdOp
from extrabalance.smpp.text import Reassembler, decode_text, parse_concat
from extrabalance.smpp.ussd import parse_ussd_deliver, ussd_deliver, ussd_submit

CREDS = {"node": "secret"}


class Harness:
    def __init__(self) -> None:
        self.submits: list[tuple[SubmitSm, str]] = []
        self.delivers: list[DeliverSm] = []
        self.on_submit_hook: Callable[[SubmitSm], object] | None = None
        self.deliver_status = 0
        self.deliver_raises = False
        self.smsc = Smsc(credentials=CREDS, on_submit=self.on_submit)
        self.port = 0
        self.esme: Esme | None = None
        self._ids = 0

    async def on_submit(self, pdu: SubmitSm, system_id: str) -> tuple[int, str]:
        self.submits.append((pdu, system_id))
        if self.on_submit_hook is not None:
            result = self.on_submit_hook(pdu)
            if asyncio.iscoroutine(result):
                await result
        self._ids += 1
        return 0, f"m{self._ids}"

    async def on_deliver(self, pdu: DeliverSm, bind: str) -> int:
        if self.deliver_raises:
            raise RuntimeError("application bug")
        self.delivers.append(pdu)
        return self.deliver_status

    def config(self, **kw: object) -> BindConfig:
        base: dict[str, object] = {"host": "127.0.0.1", "port": self.port, "system_id": "node",
                                       "password": "secret", "response_timeout_s": 2.0,
                                       "reconnect_backoff_max_s": 0.2}
        base.update(kw)
        return BindConfig(**base)  # type: ignore[arg-type]

    async def start_esme(self, binds: int = 1, **kw: object) -> Esme:
        esme_kw = {k: kw.pop(k) for k in list(kw) if k in ("submit_attempts_max",
                                                          "retry_backoff_base_s",
                                                          "timeout_resends_max")}
        self.esme = Esme([self.config(**kw) for _ in range(binds)], self.on_deliver,
                         retry_backoff_base_s=float(esme_kw.get("retry_backoff_base_s", 0.01)),
                         submit_attempts_max=int(esme_kw.get("submit_attempts_max", 6)),
                         timeout_resends_max=int(esme_kw.get("timeout_resends_max", 0)),
                         submit_wait_bound_s=2.0)
        await self.esme.start()
        return self.esme


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    harness.port = await harness.smsc.listen("127.0.0.1", 0)
    yield harness
    if harness.esme is not None:
        await harness.esme.close()
    await harness.smsc.close()


async def test_ussd_dialog_both_ways(h: Harness) -> None:
    esme = await h.start_esme()
    await esme.wait_bound(5.0)
    # gateway -> node: the subscriber dials *123#
    status = await h.smsc.deliver(ussd_deliver("201001234567", "123", "*123#",
                                               session=ItsSessionInfo(9, 0)))
    assert status == 0
    ind = parse_ussd_deliver(h.delivers[0])
    assert ind is not None and ind.text == "*123#" and ind.is_new_dialog
    assert ind.session == ItsSessionInfo(9, 0, False) and ind.msisdn == "201001234567"
    # node -> gateway: the menu, then an Arabic final screen
    menu = ussd_submit(ind.msisdn, "123", "1. Borrow 5\n2. Borrow 10",
                       op=UssdOp.USSR_REQUEST, session=ItsSessionInfo(9, 1))
    result = await esme.submit(menu)
    assert result.ok and result.message_id == "m1"
    final = ussd_submit(ind.msisdn, "123", "تم تحويل ٥ جنيه", op=UssdOp.PSSR_RESPONSE,
                        session=ItsSessionInfo(9, 2, end_of_session=True))
    assert (await esme.submit(final)).ok
    got, system_id = h.submits[1]
    assert system_id == "node" and got.data_coding == 8
    assert got.its_session_info == ItsSessionInfo(9, 2, True)
    assert decode_text(got.data_coding, got.short_message) == "تم تحويل ٥ جنيه"
    states = esme.bind_states()
    assert states[0]["state"] == "BOUND_TRX" and states[0]["bound"] is True


async def test_abort_is_flagged(h: Harness) -> None:
    esme = await h.start_esme()
    await esme.wait_bound(5.0)
    await h.smsc.deliver(ussd_deliver("2010", "123", "", op=0x81, session=ItsSessionInfo(1, 3)))
    ind = parse_ussd_deliver(h.delivers[0])
    assert ind is not None and ind.is_abort


async def test_throttled_submits_are_resent_not_dropped(h: Harness) -> None:
    esme = await h.start_esme()
    await esme.wait_bound(5.0)
    h.smsc.set_throttle(0.5)
    results = await asyncio.gather(*(esme.submit(SubmitSm(destination_addr=str(i)))
                                     for i in range(20)))
    assert all(r.ok for r in results)
    assert h.smsc.submits_throttled >= 10
    assert any(r.attempts > 1 for r in results)
    assert sorted(p.destination_addr for p, _ in h.submits) == sorted(str(i) for i in range(20))


async def test_gives_up_after_max_attempts(h: Harness) -> None:
    esme = await h.start_esme(submit_attempts_max=3)
    await esme.wait_bound(5.0)
    h.smsc.set_throttle(1.0)
    with pytest.raises(SubmitError) as info:
        await esme.submit(SubmitSm(destination_addr="1"))
    assert info.value.status == Status.ESME_RTHROTTLED and info.value.attempts == 3
    assert h.smsc.submits_throttled == 3


async def test_window_is_honoured(h: Harness) -> None:
    gate = asyncio.Event()
    in_flight = 0
    peak = 0

    async def slow(pdu: SubmitSm) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await gate.wait()
        in_flight -= 1

    h.on_submit_hook = slow
    esme = await h.start_esme(window_max=2)
    await esme.wait_bound(5.0)
    tasks = [asyncio.create_task(esme.submit(SubmitSm(destination_addr=str(i))))
             for i in range(6)]
    for _ in range(50):
        await asyncio.sleep(0.01)
        if in_flight == 2:
            break
    await asyncio.sleep(0.05)
    assert in_flight == 2
    gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r.ok for r in results) and peak == 2


async def test_wrong_password_is_reported_and_retried(h: Harness) -> None:
    esme = await h.start_esme(password="wrong")
    with pytest.raises(NotBoundError) as info:
        await esme.wait_bound(0.6)
    assert info.value.status == Status.ESME_RINVPASWD
    state = esme.bind_states()[0]
    assert "ESME_RINVPASWD" in str(state["last_error"])
    assert int(state["connects"]) >= 2  # type: ignore[call-overload]  # it keeps trying


async def test_deliver_handler_exception_answers_rx_t_appn(h: Harness) -> None:
    esme = await h.start_esme()
    await esme.wait_bound(5.0)
    h.deliver_raises = True
    assert await h.smsc.deliver(DeliverSm(source_addr="2010", short_message=b"hi")) == 0x64
    h.deliver_raises = False
    assert await h.smsc.deliver(DeliverSm(source_addr="2010", short_message=b"hi")) == 0
    assert esme.bind_states()[0]["bound"] is True


async def test_enquire_link_keeps_bind(h: Harness) -> None:
    h.smsc.enquire_link_s = 0.3
    esme = await h.start_esme(enquire_link_s=0.2)
    await esme.wait_bound(5.0)
    await asyncio.sleep(1.2)
    state = esme.bind_states()[0]
    assert state["bound"] is True and state["connects"] == 1
    assert (await esme.submit(SubmitSm())).ok


async def test_long_sms_split_and_reassembled_at_smsc(h: Harness) -> None:
    esme = await h.start_esme(binds=2)
    await esme.wait_bound(5.0)
    text = "لقد حصلت على رصيد إضافي بقيمة ١٠ جنيه، سيتم خصمه عند إعادة الشحن. " * 3
    results = await esme.send_sms("EXTRA", "201001234567", text)
    assert len(results) > 1 and all(r.ok for r in results)
    r = Reassembler()
    whole = None
    for pdu, _ in h.submits:
        assert pdu.registered_delivery == 1 and pdu.source_addr_ton == 5
        info, body = parse_concat(pdu.esm_class, pdu.short_message)
        assert info is not None
        whole = r.feed(pdu.destination_addr, info, decode_text(pdu.data_coding, body), 0.0) or whole
    assert whole == text


async def test_reconnects_after_connection_loss(h: Harness) -> None:
    esme = await h.start_esme()
    await esme.wait_bound(5.0)
    for conn in list(h.smsc._conns):
        conn.close()
    for _ in range(100):
        await asyncio.sleep(0.05)
        st = esme.bind_states()[0]
        if st["bound"] and int(st["connects"]) >= 2:  # type: ignore[call-overload]
            break
    assert esme.bind_states()[0]["bound"] is True
    assert (await esme.submit(SubmitSm())).ok


async def test_raw_peer_garbage_gets_nacks_and_bind_stays(h: Harness) -> None:
    """A hand-rolled ESME sends an unknown command, a broken submit_sm and a bad
    length; the SMSC answers each and the bind stays up."""
    import struct

    from extrabalance.smpp.pdu import (
        BindTransceiver,
        CommandId,
        EnquireLink,
        Framer,
        GenericNack,
        decode,
        encode,
    )

    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    framer = Framer()

    async def read_pdu() -> object:
        while True:
            frames = framer.feed(await asyncio.wait_for(reader.read(4096), 5.0))
            if frames:
                assert len(frames) == 1
                return decode(frames[0])  # type: ignore[arg-type]

    writer.write(encode(BindTransceiver(system_id="node", password="secret", sequence_number=1)))
    assert (await read_pdu()).command_status == 0  # type: ignore[attr-defined]
    writer.write(struct.pack(">IIII", 16, 0x0000BEEF, 0, 2))
    nack = await read_pdu()
    assert isinstance(nack, GenericNack) and nack.command_status == Status.ESME_RINVCMDID
    good = encode(SubmitSm(sequence_number=3, tlvs=((0x0501, b"\x02"),)))
    writer.write(struct.pack(">I", len(good) + 3) + good[4:] + b"\x05\x01\x00")
    resp = await read_pdu()
    assert resp.command_id == CommandId.SUBMIT_SM_RESP  # type: ignore[attr-defined]
    assert resp.command_status == Status.ESME_RINVOPTPARSTREAM  # type: ignore[attr-defined]
    writer.write(encode(EnquireLink(sequence_number=4)))
    assert (await read_pdu()).command_id == CommandId.ENQUIRE_LINK_RESP  # type: ignore[attr-defined]
    assert h.smsc.bound_system_ids() == ["node"]
    writer.close()


async def test_msgqful_is_resent_and_permanent_errors_returned(h: Harness) -> None:
    answers = [Status.ESME_RMSGQFUL, 0, Status.ESME_RINVDSTADR]

    async def on_submit(pdu: SubmitSm, system_id: str) -> tuple[int, str]:
        status = answers.pop(0)
        return status, "ok-id" if status == 0 else ""

    h.smsc.on_submit = on_submit
    esme = await h.start_esme()
    await esme.wait_bound(5.0)
    first = await esme.submit(SubmitSm(destination_addr="1"))
    assert first.ok and first.attempts == 2 and first.message_id == "ok-id"
    second = await esme.submit(SubmitSm(destination_addr="1"))
    assert second.status == Status.ESME_RINVDSTADR and second.attempts == 1


async def test_response_timeout_is_resent_when_configured(h: Harness) -> None:
    calls = 0

    async def stall_first(pdu: SubmitSm) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.8)

    h.on_submit_hook = stall_first
    esme = await h.start_esme(response_timeout_s=0.3, timeout_resends_max=1)
    await esme.wait_bound(5.0)
    result = await esme.submit(SubmitSm(destination_addr="1"))
    assert result.ok and result.attempts == 2
    assert esme.stats["timeout_resends"] == 1  # a possible duplicate, counted
    await asyncio.sleep(0.6)  # the late answer to the first try arrives and is ignored
    assert esme.bind_states()[0]["bound"] is True


async def test_submits_spread_over_binds_and_deliver_targets_system_id(h: Harness) -> None:
    esme = await h.start_esme(binds=2)
    await esme.wait_bound(5.0)
    for _ in range(50):
        if sum(1 for s in esme.bind_states() if s["bound"]) == 2:
            break
        await asyncio.sleep(0.02)
    results = await asyncio.gather(*(esme.submit(SubmitSm()) for _ in range(10)))
    names = {s["name"] for s in esme.bind_states()}
    assert len(names) == 2 and {r.bind for r in results} == names
    assert await h.smsc.deliver(DeliverSm(source_addr="1"), system_id="node") == 0
    from extrabalance.smpp.aio.server import NoReceiverError

    with pytest.raises(NoReceiverError):
        await h.smsc.deliver(DeliverSm(source_addr="1"), system_id="someone-else")


async def test_a_bind_that_cannot_be_encoded_reports_why_and_does_not_die():
    """A password longer than SMPP allows: the bind keeps trying and says why."""
    import asyncio

    from extrabalance.smpp.aio.client import BindConfig, Esme, NotBoundError

    async def on_deliver(pdu, name):
        return 0

    from extrabalance.smpp.aio.server import Smsc

    async def on_submit(pdu, system_id):
        return 0, "1"

    smsc = Smsc(credentials={"extrabalance": "pw"}, on_submit=on_submit)
    port = await smsc.listen("127.0.0.1", 0)
    esme = Esme([BindConfig("127.0.0.1", port, "extrabalance", "far-too-long-password")], on_deliver)
    await esme.start()
    try:
        try:
            await esme.wait_bound(0.5)
        except NotBoundError:
            pass
        states = esme.bind_states()
        assert states[0]["bound"] is False
        assert "PduEncodeError" in states[0]["last_error"]
        assert all(not w.task.done() for w in esme._workers)
    finally:
        await asyncio.wait_for(esme.close(), 5)
        await smsc.close()
