"""A virtual handset: dial USSD codes, answer menus, send and receive SMS.

What this file owns
-------------------
* `Handset`: one subscriber's phone attached to an in-process `SmscSimulator`. It
  opens a USSD dialog (`dial`), answers screens (`reply`), sends SMS to the short
  code (`send_sms`) and collects SMS the node sends (`inbox`, `next_sms`). The SMSC
  simulator does the SMPP; the handset only sees screens and texts, like a person.
* `run_phone` / `main_phone`: the interactive terminal handset (`extrabalance phone
  MSISDN`). Design, chosen because it is the simplest that is honest about where the
  SMPP happens: the node is an ESME and only ever talks to an SMSC, so a phone cannot
  reach a node directly. The phone therefore either
    - connects to the control channel of a running `extrabalance sim smsc` (default;
      JSON lines on a loopback TCP port, see `smsc.CONTROL_PORT_DEFAULT`), or
    - with `--embedded`, runs its own SMSC simulator on the SMPP port and waits for the
      node to bind to it, or
    - with `--modem DEVICE`, drives a GSM/3G modem with a SIM by AT commands
      (`serial_modem.py`, protocol in `at_session.py`): USSD and SMS go over the live
      network to whatever USSD gateway and SMSC serve that SIM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from extrabalance.argparsing import Parser

if TYPE_CHECKING:
    from simulators.smsc import SmscSimulator

INBOX_MAX = 1000  # SMS kept per handset; older ones are forgotten
SCREEN_TIMEOUT_S = 10.0  # how long a handset waits for the next USSD screen
CONTROL_LINE_MAX = 64 * 1024  # bytes of one control-channel JSON line


@dataclass(frozen=True, slots=True)
class Screen:
    """What the handset shows: a menu that expects a reply, or a final screen."""

    text: str
    final: bool


class HandsetError(RuntimeError):
    """A handset used the wrong way (reply without an open dialog, ...)."""


class ScreenTimeout(TimeoutError):
    """No screen came back within the timeout (the dialog is closed on our side)."""


class Handset:
    """One subscriber's phone on the SMSC simulator. One USSD dialog at a time."""

    def __init__(
        self,
        smsc: SmscSimulator,
        msisdn: str,
        *,
        screen_timeout_s: float = SCREEN_TIMEOUT_S,
        inbox_max: int = INBOX_MAX,
    ) -> None:
        if not msisdn.isascii() or not msisdn.isdigit():
            raise ValueError(f"MSISDN must be digits: {msisdn!r}")
        self.smsc = smsc
        self.msisdn = msisdn
        self.screen_timeout_s = screen_timeout_s
        self.inbox: deque[str] = deque(maxlen=inbox_max)
        self._unread: asyncio.Queue[str] = asyncio.Queue(maxsize=inbox_max)
        self._dialog_id: int | None = None
        self.last_screen: Screen | None = None
        smsc.attach(self)

    # -- USSD ------------------------------------------------------------------------

    @property
    def dialog_open(self) -> bool:
        return self._dialog_id is not None

    async def dial(self, code: str, *, timeout_s: float | None = None) -> Screen:
        """Dial a USSD string (`*123#`, `*123*2#`); returns the first screen.

        A dialog still open is abandoned first (the handset aborts it, as a phone does).
        """
        if self._dialog_id is not None:
            await self.abort()
        dialog_id, screen = await self.smsc.ussd_begin(
            self.msisdn, code, timeout_s=timeout_s or self.screen_timeout_s
        )
        return self._shown(dialog_id, screen)

    async def reply(self, text: str, *, timeout_s: float | None = None) -> Screen:
        """Answer the menu on screen; returns the next screen."""
        if self._dialog_id is None:
            raise HandsetError("no USSD dialog is open: dial first")
        dialog_id = self._dialog_id
        try:
            screen = await self.smsc.ussd_continue(
                self.msisdn, dialog_id, text, timeout_s=timeout_s or self.screen_timeout_s
            )
        except TimeoutError:
            self._dialog_id = None
            raise
        return self._shown(dialog_id, screen)

    async def abort(self) -> None:
        """Close the open dialog from the handset side (user pressed cancel)."""
        dialog_id, self._dialog_id = self._dialog_id, None
        if dialog_id is not None:
            await self.smsc.ussd_abort(self.msisdn, dialog_id)

    def _shown(self, dialog_id: int, screen: Screen) -> Screen:
        self._dialog_id = None if screen.final else dialog_id
        self.last_screen = screen
        return screen

    # -- SMS -------------------------------------------------------------------------

    async def send_sms(self, text: str, *, to: str | None = None) -> int:
        """Send an SMS (to the short code by default); returns the ESME's command_status."""
        return await self.smsc.send_mo_sms(self.msisdn, text, to=to)

    async def next_sms(self, timeout_s: float = 5.0) -> str:
        """The next SMS not read yet; raises TimeoutError when none comes in time."""
        async with asyncio.timeout(timeout_s):
            return await self._unread.get()

    def receive_sms(self, text: str) -> None:
        """Called by the SMSC simulator for every MT SMS to this handset."""
        self.inbox.append(text)
        if self._unread.full():
            self._unread.get_nowait()  # the oldest unread SMS is dropped, like a full phone
        self._unread.put_nowait(text)

    def close(self) -> None:
        self.smsc.detach(self)


# --- The interactive phone ------------------------------------------------------------


class PhoneLink(Protocol):
    """What the REPL needs, local (embedded SMSC) or remote (control channel)."""

    async def dial(self, code: str) -> Screen: ...
    async def reply(self, text: str) -> Screen: ...
    async def send_sms(self, text: str) -> int: ...
    async def abort(self) -> None: ...
    async def next_sms(self, timeout_s: float) -> str: ...
    async def close(self) -> None: ...


class _LocalLink:
    def __init__(self, handset: Handset) -> None:
        self.handset = handset

    async def dial(self, code: str) -> Screen:
        return await self.handset.dial(code)

    async def reply(self, text: str) -> Screen:
        return await self.handset.reply(text)

    async def send_sms(self, text: str) -> int:
        return await self.handset.send_sms(text)

    async def abort(self) -> None:
        await self.handset.abort()

    async def next_sms(self, timeout_s: float) -> str:
        return await self.handset.next_sms(timeout_s)

    async def close(self) -> None:
        self.handset.close()


class RemoteHandset:
    """A handset living in a `sim smsc` process, driven over its control channel.

    Protocol (JSON lines, one request then one response, SMS pushed any time):
    `{"op": "attach", "msisdn": M}` first; then `{"op": "dial"|"reply"|"sms"|"abort",
    "text": T}`; responses `{"ok": true, "screen": T, "final": B}` / `{"ok": true,
    "status": N}` / `{"ok": false, "error": T}`; pushes `{"sms": T}`.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._responses: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=16)
        self._sms: asyncio.Queue[str] = asyncio.Queue(maxsize=INBOX_MAX)
        self._lock = asyncio.Lock()  # one request in flight
        self._pump = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, host: str, port: int, msisdn: str) -> RemoteHandset:
        reader, writer = await asyncio.open_connection(host, port, limit=CONTROL_LINE_MAX)
        link = cls(reader, writer)
        await link._call({"op": "attach", "msisdn": msisdn})
        return link

    async def _read_loop(self) -> None:
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "sms" in message:
                    if self._sms.full():
                        self._sms.get_nowait()
                    self._sms.put_nowait(str(message["sms"]))
                else:
                    await self._responses.put(message)
        except (OSError, ValueError, asyncio.LimitOverrunError):
            pass
        await self._responses.put({"ok": False, "error": "control channel closed"})

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            self._writer.write(json.dumps(request).encode() + b"\n")
            await self._writer.drain()
            response = await self._responses.get()
        if not response.get("ok"):
            error = str(response.get("error", "failed"))
            if response.get("timeout"):
                raise ScreenTimeout(error)
            raise HandsetError(error)
        return response

    async def dial(self, code: str) -> Screen:
        r = await self._call({"op": "dial", "text": code})
        return Screen(str(r["screen"]), bool(r["final"]))

    async def reply(self, text: str) -> Screen:
        r = await self._call({"op": "reply", "text": text})
        return Screen(str(r["screen"]), bool(r["final"]))

    async def send_sms(self, text: str) -> int:
        return int((await self._call({"op": "sms", "text": text}))["status"])

    async def abort(self) -> None:
        await self._call({"op": "abort"})

    async def next_sms(self, timeout_s: float) -> str:
        async with asyncio.timeout(timeout_s):
            return await self._sms.get()

    async def close(self) -> None:
        self._pump.cancel()
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


PHONE_HELP = """\
Type a USSD code (*123#) to dial, then the menu option to answer.
  sms TEXT    send TEXT to the short code (e.g. sms LOAN 5)
  cancel      close the open USSD dialog
  help        this text
  quit        leave (also .quit, or Ctrl-D)
Incoming SMS are shown as they arrive."""


async def _read_line(prompt: str) -> str | None:
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, lambda: input(prompt))
    except EOFError:
        return None


async def phone_repl(link: PhoneLink, msisdn: str, *, out: Any = None) -> None:
    """The read-eval-print loop of the terminal handset."""
    out = out or sys.stdout
    in_dialog = False

    def show(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    async def sms_printer() -> None:
        while True:
            try:
                text = await link.next_sms(3600.0)
            except TimeoutError:
                continue
            show(f"\n[SMS] {text}")

    printer = asyncio.create_task(sms_printer())
    show(f"Phone {msisdn}. {PHONE_HELP}")
    try:
        while True:
            line = await _read_line("ussd> " if in_dialog else f"{msisdn}> ")
            if line is None or line.strip().lower() in {"quit", "exit", ".quit"}:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if line.lower() == "help":
                    show(PHONE_HELP)
                    continue
                if line.lower() == "cancel":
                    await link.abort()
                    in_dialog = False
                    show("(dialog closed)")
                    continue
                if line.lower().startswith("sms "):
                    status = await link.send_sms(line[4:].strip())
                    show("(sent)" if status == 0 else f"(SMS refused, status 0x{status:02x})")
                    continue
                if in_dialog:
                    screen = await link.reply(line)
                elif line.startswith(("*", "#")):
                    screen = await link.dial(line)
                else:
                    show("Dial a USSD code first (e.g. *123#), or type help.")
                    continue
            except ScreenTimeout:
                in_dialog = False
                show("(no answer from the network; dialog closed)")
                continue
            except HandsetError as exc:
                in_dialog = False
                show(f"({exc})")
                continue
            show("-" * 30 + "\n" + screen.text + "\n" + "-" * 30)
            in_dialog = not screen.final
    finally:
        printer.cancel()
        await link.close()


async def run_phone(
    msisdn: str,
    *,
    smsc_host: str = "127.0.0.1",
    smsc_port: int = 2775,
    control_port: int | None = None,
    embedded: bool = False,
    system_id: str = "extrabalance",
    password: str = "secret",
    short_code: str = "1234",
    modem: str | None = None,
    baud: int = 115200,
    ussd_encoding: str = "text",
    at_trace: bool = False,
) -> int:
    """Run the terminal handset until `quit` or end of input.

    Default: attach to the control channel of a running `sim smsc` at
    (smsc_host, control_port). `embedded=True`: start an SMSC simulator on
    (smsc_host, smsc_port) and wait for the node to bind with system_id/password.
    `modem`: drive the GSM modem at that serial device instead (SMS to short_code).
    """
    if modem is not None:
        from simulators.at_session import UssdEncoding
        from simulators.serial_modem import run_modem_phone

        return await run_modem_phone(
            msisdn, modem, baud=baud, encoding=UssdEncoding(ussd_encoding),
            short_code=short_code, trace=at_trace,
        )
    from simulators.smsc import CONTROL_PORT_DEFAULT, SmscSimulator

    if not embedded:
        port = control_port if control_port is not None else CONTROL_PORT_DEFAULT
        try:
            link: PhoneLink = await RemoteHandset.connect(smsc_host, port, msisdn)
        except (OSError, HandsetError) as exc:
            print(
                f"cannot reach the SMSC simulator's control channel at {smsc_host}:{port}: {exc}\n"
                "start one with `extrabalance sim smsc`, or use --embedded",
                file=sys.stderr,
            )
            return 2
        await phone_repl(link, msisdn)
        return 0
    smsc = SmscSimulator(
        host=smsc_host, port=smsc_port, system_id=system_id, password=password,
        short_code=short_code,
    )
    await smsc.start()
    print(f"SMSC simulator on {smsc_host}:{smsc.port}; waiting for the node to bind as {system_id!r}")
    try:
        await phone_repl(_LocalLink(Handset(smsc, msisdn)), msisdn)
    finally:
        await smsc.close()
    return 0


def _msisdn(text: str) -> str:
    from extrabalance.core.msisdn import parse_msisdn

    try:
        return parse_msisdn(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main_phone(argv: list[str]) -> int:
    """`extrabalance phone MSISDN [...]`."""
    parser = Parser(prog="extrabalance phone",
                    description=__doc__.split("\n")[0])
    parser.add_argument("msisdn", type=_msisdn,
                        help="the subscriber this handset is (E.164: up to 15 digits, "
                             "a leading + is dropped)")
    parser.add_argument("--host", default="127.0.0.1", help="where the SMSC simulator runs")
    parser.add_argument("--control-port", type=int, default=None,
                        help="control channel of `sim smsc` (default 2776)")
    parser.add_argument("--embedded", action="store_true",
                        help="run an SMSC simulator here and wait for the node to bind")
    parser.add_argument("--smpp-port", type=int, default=2775, help="SMPP port with --embedded")
    parser.add_argument("--system-id", default="extrabalance", help="bind system_id (--embedded)")
    parser.add_argument("--password", default="secret", help="bind password (--embedded)")
    parser.add_argument("--short-code", default="1234",
                        help="where `sms TEXT` goes (the node's short code)")
    modem = parser.add_argument_group(
        "GSM modem", "a USB modem (or a phone in modem mode) with a SIM, driven by AT "
        "commands: USSD and SMS over the live network")
    modem.add_argument("--modem", metavar="DEVICE", default=None,
                       help="the modem's serial device (e.g. /dev/ttyUSB2)")
    modem.add_argument("--baud", type=int, default=115200, help="serial speed (default 115200)")
    modem.add_argument("--ussd-encoding", choices=["text", "gsm7-hex", "ucs2-hex"],
                       default="text",
                       help="how USSD strings go to the modem: text (AT+CSCS=\"IRA\"), "
                       "gsm7-hex (packed GSM 7-bit as hex, many Huawei/ZTE sticks) or "
                       "ucs2-hex (AT+CSCS=\"UCS2\"); default text")
    modem.add_argument("--at-trace", action="store_true",
                       help="print every AT command and answer on stderr")
    args = parser.parse_args(argv)
    if args.modem is not None:
        from simulators.serial_modem import baud_constant

        if args.embedded:
            parser.error("--modem and --embedded exclude each other")
        try:
            baud_constant(args.baud)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        return asyncio.run(
            run_phone(
                args.msisdn, smsc_host=args.host, smsc_port=args.smpp_port,
                control_port=args.control_port, embedded=args.embedded,
                system_id=args.system_id, password=args.password, short_code=args.short_code,
                modem=args.modem, baud=args.baud, ussd_encoding=args.ussd_encoding,
                at_trace=args.at_trace,
            )
        )
    except KeyboardInterrupt:
        return 0
