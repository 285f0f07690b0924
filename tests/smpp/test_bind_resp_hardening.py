"""A bind_resp the node cannot trust ends the connection and the bind is tried again
after the backoff (issue 22, finding 5): one without the NUL after system_id, one of
70 KB, one that answers another sequence number. Sans-IO first, then a fake SMSC."""

from __future__ import annotations

import asyncio
import struct

import pytest

from extrabalance.smpp.aio.client import BindConfig, Esme
from extrabalance.smpp.pdu import BindTransceiverResp, BindTransmitterResp, CommandId, encode
from extrabalance.smpp.session import BindRefused, Bound, Role, Session, State

BIND_TRX_RESP = CommandId.BIND_TRANSCEIVER_RESP


def no_nul(seq: int) -> bytes:
    """bind_transceiver_resp whose system_id runs to the end of the PDU, no NUL."""
    body = b"SMSC-without-terminator"
    return struct.pack(">IIII", 16 + len(body), BIND_TRX_RESP, 0, seq) + body


def oversize(seq: int) -> bytes:
    body = b"S" * 70_000 + b"\x00"
    return struct.pack(">IIII", 16 + len(body), BIND_TRX_RESP, 0, seq) + body


def wrong_seq(seq: int) -> bytes:
    return encode(BindTransceiverResp(system_id="SMSC"), seq + 7)


def wrong_kind(seq: int) -> bytes:
    return encode(BindTransmitterResp(system_id="SMSC"), seq)


BAD = {"no-nul": no_nul, "70KB": oversize, "wrong-seq": wrong_seq, "wrong-kind": wrong_kind}


@pytest.mark.parametrize("make", BAD.values(), ids=BAD.keys())
def test_session_closes_on_an_untrustworthy_bind_resp(make) -> None:
    esme = Session(Role.ESME)
    seq = esme.bind("trx", "node", "secret", now_s=0.0)
    esme.data_to_send()
    events = esme.receive_data(make(seq), 0.0)
    assert not any(isinstance(e, Bound) for e in events)
    refused = [e for e in events if isinstance(e, BindRefused)]
    assert len(refused) == 1 and refused[0].detail
    assert esme.state is State.CLOSED
    assert esme.data_to_send() == b""  # nothing answered to a response


def test_a_good_bind_resp_still_binds() -> None:
    esme = Session(Role.ESME)
    seq = esme.bind("trx", "node", "secret", now_s=0.0)
    events = esme.receive_data(encode(BindTransceiverResp(system_id="SMSC"), seq), 0.0)
    assert any(isinstance(e, Bound) for e in events) and esme.state is State.BOUND_TRX


class FakeSmsc:
    """Answers the first `bad_binds` binds with `make(seq)`, then a good bind_resp."""

    def __init__(self, make, bad_binds: int) -> None:
        self.make = make
        self.bad_binds = bad_binds
        self.binds = 0
        self.closed_by_esme = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(16)
            length, cid, _, seq = struct.unpack(">IIII", head)
            await reader.readexactly(length - 16)
            assert cid == CommandId.BIND_TRANSCEIVER
            self.binds += 1
            if self.binds <= self.bad_binds:
                writer.write(self.make(seq))
                await writer.drain()
                if await reader.read(1) == b"":  # the ESME hangs up, as it must
                    self.closed_by_esme += 1
                return
            writer.write(encode(BindTransceiverResp(system_id="SMSC"), seq))
            await writer.drain()
            while await reader.read(65536):
                pass
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("make", BAD.values(), ids=BAD.keys())
async def test_esme_rebinds_after_an_untrustworthy_bind_resp(make) -> None:
    smsc = FakeSmsc(make, bad_binds=2)
    server = await asyncio.start_server(smsc.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def on_deliver(pdu, bind_name):  # pragma: no cover - nothing is delivered
        return 0

    # response_timeout_s is long: the rebind must come from the bad answer, not a timer.
    esme = Esme(
        [
            BindConfig(
                "127.0.0.1",
                port,
                "node",
                "secret",
                response_timeout_s=60.0,
                reconnect_backoff_max_s=0.2,
            )
        ],
        on_deliver,
    )
    await esme.start()
    try:
        await esme.wait_bound(20.0)
        assert smsc.binds == 3 and smsc.closed_by_esme == 2
        [state] = esme.bind_states()
        assert state["bound"] is True
    finally:
        await esme.close()
        server.close()
