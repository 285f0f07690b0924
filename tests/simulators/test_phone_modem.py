"""`extrabalance phone MSISDN --modem DEVICE` end to end over a pseudo-terminal.

The modem is a fake on the pty's master side (a thread): it answers the phone's AT
commands, plays a three-screen USSD dialog and delivers one SMS by +CMTI / +CMGR, in
each of the three USSD encodings. Its own codecs come from `extrabalance.smpp.text`,
not from the session under test. No network, no real modem.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pty
import select
import threading
import time
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from extrabalance.smpp.text import gsm7_decode, gsm7_encode, pack_septets, unpack_septets
from simulators import handset as handset_module
from simulators.at_session import AtSession, UssdEncoding
from simulators.handset import (
    HandsetError,
    ScreenTimeout,
    main_phone,
)
from simulators.serial_modem import (
    EXIT_NO_DEVICE,
    EXIT_NOT_ANSWERING,
    ModemHandset,
    open_serial,
    run_modem_phone,
)

MENU = "Extra Balance (owe 0.00 EGP)\n1 Borrow 1.00 EGP\n2 My loans"
CONFIRM = "Borrow 1.00 EGP? Fee 0.15 EGP.\n1 Yes\n2 No"
DONE = "Done: 1.00 EGP added to your balance."
SMS = "Extra Balance: 1.00 EGP added (fee 0.15 EGP). You owe 1.15 EGP."


class FakeModem(threading.Thread):
    """Just enough of a USB stick: AT commands in, result codes out, on a pty master."""

    def __init__(self, master_fd: int, encoding: UssdEncoding) -> None:
        super().__init__(daemon=True)
        self.fd = master_fd
        self.encoding = encoding
        self.commands: list[str] = []
        self.sms_sent: list[str] = []
        self._stopping = threading.Event()
        self._screen = 0
        self._awaiting_sms_text = False

    def stop(self) -> None:
        self._stopping.set()
        self.join(2.0)

    def run(self) -> None:
        buffer = b""
        while not self._stopping.is_set():
            if not select.select([self.fd], [], [], 0.02)[0]:
                continue
            try:
                buffer += os.read(self.fd, 1024)
            except OSError:
                return
            while True:
                end = buffer.find(b"\x1a" if self._awaiting_sms_text else b"\r")
                if end < 0:
                    break
                line, buffer = buffer[:end].decode("latin-1"), buffer[end + 1:]
                self._answer(line.strip("\r\n"))

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode("latin-1"))

    def _answer(self, line: str) -> None:
        if self._awaiting_sms_text:
            self._awaiting_sms_text = False
            self.sms_sent.append(line)
            self.send("\r\n+CMGS: 7\r\n\r\nOK\r\n")
            return
        self.commands.append(line)
        if line == "ATE0":
            self.send("ATE0\r\r\nOK\r\n")  # echo is on until this command
        elif line.startswith("AT+CUSD=1,"):
            self._ussd(self._decode(line.split('"')[1]))
        elif line.startswith("AT+CMGS="):
            self._awaiting_sms_text = True
            self.send("\r\n> ")
        elif line == "AT+CMGR=3":
            self.send('\r\n+CMGR: "REC UNREAD","1234",,"24/05/01,10:00:00+08",129,4,0,0,'
                      f'"+20100000",145,{len(SMS)}\r\n{self._sms_text(SMS)}\r\n\r\nOK\r\n')
        else:  # ATE0 done: AT+CMEE, AT+CSCS, AT+CMGF, AT+CSDH, AT+CNMI, AT+CUSD=2, AT+CMGD
            self.send("\r\nOK\r\n")

    def _ussd(self, text: str) -> None:
        if text == "*999#":
            self.send("\r\nOK\r\n\r\n+CUSD: 4\r\n")
            return
        self._screen = self._screen + 1 if text == "1" else (1 if text == "*123#" else 0)
        if self._screen == 1:
            self.send("\r\nOK\r\n\r\n^RSSI: 17\r\n" + self._cusd(1, MENU))
        elif self._screen == 2:  # Huawei order: the screen before OK
            self.send(self._cusd(1, CONFIRM) + "\r\nOK\r\n")
        else:
            self.send("\r\nOK\r\n" + self._cusd(0, DONE))
            time.sleep(0.02)
            self.send('\r\n+CMTI: "SM",3\r\n')

    def _decode(self, raw: str) -> str:
        if self.encoding is UssdEncoding.GSM7_HEX:
            return gsm7_decode(unpack_septets(bytes.fromhex(raw))).rstrip("\r")
        if self.encoding is UssdEncoding.UCS2_HEX:
            return bytes.fromhex(raw).decode("utf-16-be")
        return raw

    def _cusd(self, m: int, text: str) -> str:
        if self.encoding is UssdEncoding.GSM7_HEX:
            septets = gsm7_encode(text)
            if len(septets) % 8 == 7:
                septets += b"\r"
            return f'\r\n+CUSD: {m},"{pack_septets(septets).hex().upper()}",15\r\n'
        if self.encoding is UssdEncoding.UCS2_HEX:  # as networks answer in UCS2: dcs 72
            return f'\r\n+CUSD: {m},"{text.encode("utf-16-be").hex().upper()}",72\r\n'
        lines = text.replace("\n", "\r\n")  # a text-mode menu spans several lines
        return f'\r\n+CUSD: {m},"{lines}",15\r\n'

    def _sms_text(self, text: str) -> str:
        if self.encoding is UssdEncoding.UCS2_HEX:
            return text.encode("utf-16-be").hex().upper()
        return text


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, str]]:
    master_fd, slave_fd = pty.openpty()
    tty.setraw(slave_fd)
    try:
        yield master_fd, os.ttyname(slave_fd)
    finally:
        for fd in (master_fd, slave_fd):
            with contextlib.suppress(OSError):  # a test may have closed the master
                os.close(fd)


@pytest.mark.parametrize("encoding", list(UssdEncoding), ids=lambda e: e.value)
def test_phone_on_a_modem_plays_a_dialog_and_shows_the_sms(
    encoding: UssdEncoding, pty_pair: tuple[int, str],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    master_fd, device = pty_pair
    modem = FakeModem(master_fd, encoding)
    modem.start()
    script = iter(["*123#", "1", "1", None, "sms LOAN 5", "*999#", "*123#", "cancel", ".quit"])
    prompts: list[str] = []
    printed: list[str] = []

    async def scripted(prompt: str) -> str | None:
        prompts.append(prompt)
        line = next(script)
        if line is None:  # wait for the SMS the network sends after the loan
            async with asyncio.timeout(2.0):
                while not any("[SMS]" in text for text in printed):
                    printed.append(capsys.readouterr().out)
                    await asyncio.sleep(0.01)
            line = next(script)
        return line

    monkeypatch.setattr(handset_module, "_read_line", scripted)
    started = time.monotonic()
    try:
        code = main_phone(["201000000001", "--modem", device,
                           "--ussd-encoding", encoding.value])
    finally:
        modem.stop()
    captured = capsys.readouterr()
    out = "".join(printed) + captured.out
    assert code == 0, captured.err
    assert time.monotonic() - started < 3.0
    assert MENU in out and CONFIRM in out and DONE in out
    assert f"[SMS] {SMS}" in out
    assert "(sent)" in out and modem.sms_sent == [
        "LOAN 5" if encoding is not UssdEncoding.UCS2_HEX else "LOAN 5".encode(
            "utf-16-be").hex().upper()]
    assert "USSD operation not supported by the network (+CUSD: 4)" in out
    assert "(dialog closed)" in out
    # menus keep the dialog open; the final screen returns to the dial prompt
    assert prompts[:4] == ["201000000001> ", "ussd> ", "ussd> ", "201000000001> "]
    assert prompts[-2] == "ussd> "  # after the second *123#, before cancel
    assert modem.commands[:2] == ["ATE0", "AT+CMEE=1"]
    assert f'AT+CSCS="{encoding.charset}"' in modem.commands
    assert {"AT+CMGF=1", "AT+CNMI=2,1,0,0,0", "AT+CMGR=3", "AT+CMGD=3", "AT+CUSD=2"} <= set(
        modem.commands)
    assert "Traceback" not in captured.err


def test_missing_device_and_non_tty_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main_phone(["201", "--modem", str(tmp_path / "ttyUSB9")]) == EXIT_NO_DEVICE
    assert "no such device" in capsys.readouterr().err
    regular = tmp_path / "not-a-tty"
    regular.write_bytes(b"")
    assert main_phone(["201", "--modem", str(regular)]) == EXIT_NO_DEVICE
    assert "is not a serial device" in capsys.readouterr().err


async def test_a_modem_that_does_not_answer(pty_pair: tuple[int, str]) -> None:
    _, device = pty_pair
    err = io.StringIO()
    code = await run_modem_phone("201", device, init_timeout_s=0.05, err=err)
    assert code == EXIT_NOT_ANSWERING
    assert "does not answer AT commands" in err.getvalue()


async def _answer(master_fd: int, reply: bytes) -> bytes:
    """Read what the phone wrote to the modem, then answer `reply`."""
    data = await asyncio.to_thread(os.read, master_fd, 1024)
    os.write(master_fd, reply)
    return data


@contextlib.asynccontextmanager
async def link_on(device: str, screen_timeout_s: float) -> AsyncIterator[ModemHandset]:
    """The phone's modem link on the pty's slave side, without the REPL."""
    fd = open_serial(device, 115200)
    link = ModemHandset(fd, AtSession(), short_code="1234", screen_timeout_s=screen_timeout_s)
    try:
        yield link
    finally:
        await link.close()
        os.close(fd)


async def test_no_screen_in_time_cancels_the_dialog(pty_pair: tuple[int, str]) -> None:
    master_fd, device = pty_pair
    async with link_on(device, screen_timeout_s=0.2) as link:
        dial = asyncio.create_task(link.dial("*123#"))
        assert await _answer(master_fd, b"\r\nOK\r\n") == b'AT+CUSD=1,"*123#",15\r'
        assert await _answer(master_fd, b"\r\nOK\r\n") == b"AT+CUSD=2\r"
        with pytest.raises(ScreenTimeout):
            await dial


async def test_a_modem_unplugged_mid_dialog_ends_the_wait(pty_pair: tuple[int, str]) -> None:
    master_fd, device = pty_pair
    async with link_on(device, screen_timeout_s=5.0) as link:
        dial = asyncio.create_task(link.dial("*123#"))
        await _answer(master_fd, b"\r\nOK\r\n")
        await asyncio.sleep(0.05)
        os.close(master_fd)  # the slave side now reads EIO, as when the stick is pulled
        with pytest.raises(HandsetError, match="the modem (stopped answering|closed the line)"):
            async with asyncio.timeout(1.0):
                await dial
        with pytest.raises(HandsetError):
            await link.send_sms("BAL")


def test_modem_flags_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["201", "--modem", "x", "--embedded"], ["201", "--modem", "x", "--baud", "7"],
                 ["201", "--modem", "x", "--ussd-encoding", "utf8"]):
        with pytest.raises(SystemExit) as exited:
            main_phone(argv)
        assert exited.value.code == 2
    assert "unsupported baud rate 7" in capsys.readouterr().err
