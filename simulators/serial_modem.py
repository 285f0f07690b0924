"""The terminal phone on a GSM/3G modem: a serial device driven with AT commands.

What this file owns
-------------------
* `open_serial(path, baud)`: the device as a non-blocking file descriptor in raw
  mode at `baud`, 8N1, no flow control (stdlib termios only). Failures become
  `ModemError` with a message for people (no such device, permission, not a tty).
* `ModemHandset`: the `PhoneLink` the phone's REPL drives. The protocol is all in
  `at_session.AtSession`; this class only moves bytes between it and the device with
  asyncio's add_reader, keeps its command timer, and turns +CUSD results into
  `Screen`s and incoming SMS into the inbox. One USSD or SMS operation at a time.
* `run_modem_phone`: open, initialise (ATE0, AT+CMEE=1, AT+CSCS, AT+CMGF=1,
  AT+CSDH=1, AT+CNMI) and run the REPL until quit.

With a modem the MSISDN given to `extrabalance phone` only labels the prompt: the
network knows the subscriber by the SIM in the modem.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

from extrabalance.smpp.text import TextCodingError
from simulators.at_session import (
    AtSession,
    CommandError,
    CommandOk,
    CommandTimeout,
    Discarded,
    Event,
    SmsReceived,
    Unsolicited,
    UssdEncoding,
    UssdResult,
    UssdStatus,
)
from simulators.handset import INBOX_MAX, HandsetError, Screen, ScreenTimeout, phone_repl

BAUD_DEFAULT = 115200
READ_CHUNK_BYTES = 4096
WRITE_PENDING_MAX_BYTES = 64 * 1024  # unwritten bytes before the modem counts as stuck
MODEM_SCREEN_TIMEOUT_S = 30.0  # a live network can take many seconds per USSD screen
USSD_RESULTS_MAX = 8  # +CUSD kept while nobody waits (network-initiated ones included)
INIT_ATTEMPTS_MAX = 3  # ATE0 tries before the modem counts as not answering
INIT_TIMEOUT_S = 2.0  # each of them
# AT+CNMI=<mode>,<mt>,<bm>,<ds>,<bfr>: mt=1, a stored SMS is announced with +CMTI.
NEW_SMS_INDICATION = "AT+CNMI=2,1,0,0,0"

EXIT_NO_DEVICE = 2  # cannot open the device (as the control-channel error of the phone)
EXIT_NOT_ANSWERING = 3  # opened, but no answer to AT commands


class ModemError(RuntimeError):
    """The modem cannot be used; the message says why, for the person at the terminal."""


def baud_constant(baud: int) -> int:
    """The termios speed constant for `baud`; ValueError when termios has none."""
    value = getattr(termios, f"B{baud}", None)
    if not isinstance(value, int) or baud <= 0:
        raise ValueError(f"unsupported baud rate {baud}")
    return value


def open_serial(path: str, baud: int) -> int:
    """Open the serial device raw (8N1, no echo, no flow control) at `baud`."""
    speed = baud_constant(baud)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ModemError(f"no such device: {path}") from None
    except PermissionError:
        raise ModemError(
            f"no permission to open {path} (on Linux the user is usually added to the "
            "'dialout' group)"
        ) from None
    except OSError as exc:
        raise ModemError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        iflag, oflag, cflag, lflag, _, _, cc = termios.tcgetattr(fd)
        iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                   | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
                   | termios.IXOFF | termios.INPCK)
        oflag &= ~termios.OPOST
        lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG
                   | termios.IEXTEN)
        cflag &= ~(termios.CSIZE | termios.PARENB | termios.CSTOPB | termios.CRTSCTS)
        cflag |= termios.CS8 | termios.CREAD | termios.CLOCAL
        cc[termios.VMIN], cc[termios.VTIME] = 0, 0
        termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, speed, speed, cc])
        termios.tcflush(fd, termios.TCIOFLUSH)
    except termios.error as exc:
        os.close(fd)
        reason = exc.args[1] if len(exc.args) > 1 else exc
        raise ModemError(f"{path} is not a serial device ({reason})") from None
    return fd


class ModemHandset:
    """A `PhoneLink` over an AT session on an open serial device (see the module doc)."""

    def __init__(
        self,
        fd: int,
        session: AtSession,
        *,
        short_code: str,
        screen_timeout_s: float = MODEM_SCREEN_TIMEOUT_S,
        trace: Callable[[str], None] | None = None,
    ) -> None:
        self.fd = fd
        self.session = session
        self.short_code = short_code
        self.screen_timeout_s = screen_timeout_s
        self._trace = trace
        self._loop = asyncio.get_running_loop()
        self._waiters: dict[int, asyncio.Future[Event]] = {}
        # +CUSD that came while nobody waited (before the OK of AT+CUSD, or from the
        # network unasked); the one the open exchange waits for goes to _screen_waiter.
        self._screens: deque[UssdResult] = deque(maxlen=USSD_RESULTS_MAX)
        self._screen_waiter: asyncio.Future[UssdResult] | None = None
        self._sms: asyncio.Queue[str] = asyncio.Queue(maxsize=INBOX_MAX)
        self._lock = asyncio.Lock()  # one USSD exchange or SMS at a time
        self._timer: asyncio.TimerHandle | None = None
        self._tx_pending = bytearray()
        self._lost: str | None = None
        self._loop.add_reader(fd, self._on_readable)

    # -- bytes in and out -------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: the modem went away (USB unplugged, pty closed)
            self._lose(f"the modem stopped answering ({exc.strerror or exc})")
            return
        if not data:
            self._lose("the modem closed the line")
            return
        self._log("<<", data)
        self._handle(self.session.receive_data(data, self._loop.time()))

    def _on_timer(self) -> None:
        self._timer = None
        self._handle(self.session.tick(self._loop.time()))

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, CommandOk | CommandError | CommandTimeout):
                waiter = self._waiters.pop(event.command_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(event)
                elif isinstance(event, CommandError | CommandTimeout):
                    self._note(f"{event.command}: {_failure(event)}")
            elif isinstance(event, UssdResult):
                screen_waiter = self._screen_waiter
                if screen_waiter is not None and not screen_waiter.done():
                    screen_waiter.set_result(event)
                else:
                    self._screens.append(event)
            elif isinstance(event, SmsReceived):
                if self._sms.full():
                    self._sms.get_nowait()  # the oldest unread SMS goes, like a full phone
                self._sms.put_nowait(event.text)
            elif isinstance(event, Unsolicited):
                self._note(f"ignored: {event.line}")
            elif isinstance(event, Discarded):
                self._note(f"discarded: {event.reason}")
        self._flush()
        self._arm_timer()

    def _flush(self) -> None:
        data = self.session.data_to_send()
        if data:
            self._log(">>", data)
            self._tx_pending += data
        if not self._tx_pending or self._lost:
            return
        if len(self._tx_pending) > WRITE_PENDING_MAX_BYTES:
            self._lose("the modem does not take what is written to it")
            return
        try:
            written = os.write(self.fd, self._tx_pending)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self._lose(f"cannot write to the modem ({exc.strerror or exc})")
            return
        del self._tx_pending[:written]
        if self._tx_pending:
            self._loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        self._loop.remove_writer(self.fd)
        self._flush()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline_s = self.session.next_deadline_s()
        if deadline_s is not None and self._lost is None:
            self._timer = self._loop.call_at(deadline_s, self._on_timer)

    def _lose(self, reason: str) -> None:
        if self._lost is not None:
            return
        self._lost = reason
        self._note(reason)
        self._detach()
        waiters: list[asyncio.Future[Any] | None] = [*self._waiters.values(), self._screen_waiter]
        for waiter in waiters:
            if waiter is not None and not waiter.done():
                waiter.set_exception(ModemError(reason))
        self._waiters.clear()

    def _detach(self) -> None:
        self._loop.remove_reader(self.fd)
        self._loop.remove_writer(self.fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _log(self, direction: str, data: bytes) -> None:
        if self._trace is not None:
            self._trace(f"AT {direction} {data!r}")

    def _note(self, text: str) -> None:
        if self._trace is not None:
            self._trace(f"modem: {text}")

    # -- commands ---------------------------------------------------------------------

    async def command(self, line: str, *, timeout_s: float | None = None) -> CommandOk:
        """Run one AT command; raises HandsetError on an error result, ModemError on
        a timeout or when the modem is gone."""
        return await self._run(lambda now_s: self.session.command(line, now_s, timeout_s=timeout_s))

    async def _run(self, queue: Callable[[float], int]) -> CommandOk:
        if self._lost is not None:
            raise ModemError(self._lost)
        try:
            command_id = queue(self._loop.time())
        except TextCodingError as exc:
            raise HandsetError(str(exc)) from None
        except OverflowError as exc:
            raise HandsetError(f"modem busy: {exc}") from None
        waiter: asyncio.Future[Event] = self._loop.create_future()
        self._waiters[command_id] = waiter
        self._handle([])
        result = await waiter
        if isinstance(result, CommandTimeout):
            raise ModemError(f"the modem did not answer {result.command} "
                             f"within {result.timeout_s:g} s")
        if isinstance(result, CommandError):
            raise HandsetError(f"{result.command}: {_failure(result)}")
        assert isinstance(result, CommandOk)
        return result

    # -- PhoneLink --------------------------------------------------------------------

    async def dial(self, code: str) -> Screen:
        return await self._ussd_exchange(code)

    async def reply(self, text: str) -> Screen:
        return await self._ussd_exchange(text)

    async def _ussd_exchange(self, text: str) -> Screen:
        async with self._lock:
            self._screens.clear()  # a screen nobody waited for is stale now
            try:
                await self._run(lambda now_s: self.session.ussd_send(
                    text, now_s, timeout_s=self.screen_timeout_s))
                result = self._screens.popleft() if self._screens else await self._next_screen()
            except ModemError as exc:
                raise HandsetError(str(exc)) from None
            except TimeoutError:
                with contextlib.suppress(HandsetError, ModemError):
                    await self._run(self.session.ussd_cancel)
                raise ScreenTimeout(f"no USSD answer within {self.screen_timeout_s:g} s") from None
        return screen_of(result)

    async def _next_screen(self) -> UssdResult:
        waiter: asyncio.Future[UssdResult] = self._loop.create_future()
        self._screen_waiter = waiter
        try:
            async with asyncio.timeout(self.screen_timeout_s):
                return await waiter
        finally:
            self._screen_waiter = None

    async def abort(self) -> None:
        async with self._lock:
            # Some modems answer ERROR when no dialog is open: nothing to close then.
            with contextlib.suppress(HandsetError, ModemError):
                await self._run(self.session.ussd_cancel)

    async def send_sms(self, text: str) -> int:
        async with self._lock:
            try:
                await self._run(lambda now_s: self.session.sms_send(self.short_code, text, now_s))
            except ModemError as exc:
                raise HandsetError(str(exc)) from None
            except HandsetError as exc:
                raise HandsetError(f"SMS not sent: {exc}") from None
        return 0

    async def next_sms(self, timeout_s: float) -> str:
        async with asyncio.timeout(timeout_s):
            return await self._sms.get()

    async def close(self) -> None:
        if self._lost is None:
            self._detach()
            self._lost = "closed"
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()


def screen_of(result: UssdResult) -> Screen:
    """What the phone shows for a +CUSD: a menu (m=1), a final screen (m=0, 2, 3);
    m=4 and m=5 raise HandsetError with the reason."""
    text = result.text or ""
    if result.status is UssdStatus.MENU:
        return Screen(text, final=False)
    if result.status is UssdStatus.DONE:
        return Screen(text or "(done)", final=True)
    if result.status is UssdStatus.TERMINATED:
        return Screen(text or "(USSD session ended by the network)", final=True)
    if result.status is UssdStatus.OTHER_CLIENT:
        return Screen(text or "(USSD answered by another client of the modem)", final=True)
    if result.status is UssdStatus.NOT_SUPPORTED:
        raise HandsetError("USSD operation not supported by the network (+CUSD: 4)")
    raise HandsetError("USSD network time out (+CUSD: 5); dialog closed")


def _failure(event: CommandError | CommandTimeout) -> str:
    if isinstance(event, CommandTimeout):
        return f"no answer within {event.timeout_s:g} s"
    return event.describe()


async def initialise(link: ModemHandset, *, timeout_s: float = INIT_TIMEOUT_S) -> list[str]:
    """Bring the modem to the state the phone needs; returns warnings for settings it
    refused (USSD may still work without SMS). Raises ModemError when it does not
    answer at all."""
    for _ in range(INIT_ATTEMPTS_MAX):
        try:
            await link.command("ATE0", timeout_s=timeout_s)
            break
        except HandsetError:  # ERROR: someone answers; garbage in its buffer, say
            break
        except ModemError:
            continue
    else:
        raise ModemError("the modem does not answer AT commands")
    warnings: list[str] = []
    settings = (
        ("AT+CMEE=1", "error codes will not be numeric"),
        (f'AT+CSCS="{link.session.encoding.charset}"', "the character set may not match"),
        ("AT+CMGF=1", "SMS will not work (no text mode)"),
        ("AT+CSDH=1", "SMS in UCS2 may show as hex"),
        (NEW_SMS_INDICATION, "incoming SMS will not be shown"),
    )
    for line, consequence in settings:
        try:
            await link.command(line)
        except (HandsetError, ModemError) as exc:
            warnings.append(f"{exc}: {consequence}")
    return warnings


async def run_modem_phone(
    msisdn: str,
    device: str,
    *,
    baud: int = BAUD_DEFAULT,
    encoding: UssdEncoding = UssdEncoding.TEXT,
    short_code: str = "1234",
    screen_timeout_s: float = MODEM_SCREEN_TIMEOUT_S,
    init_timeout_s: float = INIT_TIMEOUT_S,
    trace: bool = False,
    err: TextIO | None = None,
) -> int:
    """The terminal phone on the modem at `device` until quit; the exit code."""
    err = err or sys.stderr

    def say(text: str) -> None:
        err.write(text + "\n")
        err.flush()

    try:
        fd = open_serial(device, baud)
    except ModemError as exc:
        say(f"cannot use the modem: {exc}")
        return EXIT_NO_DEVICE
    try:
        session = AtSession(encoding)
        link = ModemHandset(fd, session, short_code=short_code,
                            screen_timeout_s=screen_timeout_s, trace=say if trace else None)
        try:
            warnings = await initialise(link, timeout_s=init_timeout_s)
        except ModemError as exc:
            await link.close()
            say(f"cannot use the modem on {device}: {exc} (check --baud, and that no other "
                "program, such as ModemManager, holds the device)")
            return EXIT_NOT_ANSWERING
        for warning in warnings:
            say(f"warning: {warning}")
        say(f"Modem on {device} ready; USSD encoding {encoding.value}, SMS to {short_code}.")
        await phone_repl(link, msisdn)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return 0
