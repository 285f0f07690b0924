"""Wire conformance: capture a loopback Esme <-> Smsc run and let tshark decode it.

Skips (with the reason printed) when tshark/dumpcap are missing or capturing on the
loopback interface is not permitted.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from extrabalance.smpp.aio.client import BindConfig, Esme
from extrabalance.smpp.aio.server import Smsc
from extrabalance.smpp.pdu import DeliverSm, ItsSessionInfo, SubmitSm, UssdOp
from extrabalance.smpp.ussd import ussd_deliver, ussd_submit

pytestmark = pytest.mark.wire


def _skip(reason: str) -> None:
    print(f"SKIP tshark wire test: {reason}")
    pytest.skip(reason)


async def _start_capture(port: int, path: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        "dumpcap", "-q", "-i", "lo", "-f", f"tcp port {port}", "-w", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    # dumpcap has no "ready" signal in quiet mode; wait for the file to appear.
    for _ in range(100):
        await asyncio.sleep(0.05)
        if proc.returncode is not None:
            err = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
            _skip(f"dumpcap failed: {err.strip()[:200]}")
        if path.exists():
            await asyncio.sleep(0.3)
            return proc
    proc.kill()
    _skip("dumpcap did not start capturing")
    raise AssertionError("unreachable")


async def test_loopback_capture_decodes_without_malformed_pdus(tmp_path: Path) -> None:
    if shutil.which("tshark") is None or shutil.which("dumpcap") is None:
        _skip("tshark/dumpcap not installed")
    ids = iter(range(1, 1000))

    async def on_submit(pdu: SubmitSm, system_id: str) -> tuple[int, str]:
        return 0, f"msg{next(ids)}"

    async def on_deliver(pdu: DeliverSm, bind: str) -> int:
        return 0

    smsc = Smsc(credentials={"node": "secret"}, on_submit=on_submit, enquire_link_s=0.3)
    port = await smsc.listen("127.0.0.1", 0)
    pcap = tmp_path / "smpp.pcapng"
    capture = await _start_capture(port, pcap)
    esme = Esme([BindConfig("127.0.0.1", port, "node", "secret", system_type="USSD",
                            enquire_link_s=0.2)], on_deliver, retry_backoff_base_s=0.01)
    try:
        await esme.start()
        await esme.wait_bound(5.0)
        await smsc.deliver(ussd_deliver("201001234567", "123", "*123#",
                                        session=ItsSessionInfo(5, 0)))
        await esme.submit(ussd_submit("201001234567", "123", "1. Borrow 5\n2. Borrow 10",
                                      op=UssdOp.USSR_REQUEST, session=ItsSessionInfo(5, 1)))
        await esme.send_sms("EXTRA", "201001234567", "تم تحويل رصيد إضافي " * 6)
        smsc.set_throttle(0.5)
        await asyncio.gather(*(esme.submit(SubmitSm(destination_addr="2010")) for _ in range(4)))
        await asyncio.sleep(0.6)  # enquire_link both ways
    finally:
        await esme.close()
        await smsc.close()
        await asyncio.sleep(0.3)
        capture.terminate()
        await capture.wait()

    proc = await asyncio.create_subprocess_exec(
        "tshark", "-r", str(pcap), "-d", f"tcp.port=={port},smpp", "-V",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode(errors="replace")
    text = stdout.decode(errors="replace")
    (tmp_path / "decoded.txt").write_text(text)
    assert "Short Message Peer to Peer" in text
    assert "Malformed" not in text and "malformed" not in text
    for command in ("Bind_transceiver", "Submit_sm", "Deliver_sm", "Enquire_link", "Unbind"):
        assert command in text, command
    assert "Throttling error" in text or "ESME_RTHROTTLED" in text or "0x00000058" in text
    assert "USSD service operation" in text or "ussd_service_op" in text.lower()
