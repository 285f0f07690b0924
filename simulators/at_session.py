"""An AT command session with a GSM/3G modem: USSD and SMS in text mode, sans-IO.

What this file owns
-------------------
* Framing: bytes read from the modem become lines (a line ends at LF; CRs around it
  are dropped). A run of more than `line_max_bytes` without a line end is discarded
  and reported. The "> " prompt of AT+CMGS, which has no line end, is recognised.
* The command pipeline: one command in flight (AT is half duplex), at most
  `commands_queued_max` waiting, each with its own timeout. A command ends with a
  final result code: OK, or ERROR / +CME ERROR: n / +CMS ERROR: n / NO CARRIER / ...;
  the information lines that arrive meanwhile (`+NAME:` of an `AT+NAME` command, the
  text of an SMS read with AT+CMGR) are its response. The echo of the command line
  (before ATE0 took effect) is skipped.
* Unsolicited result codes: +CUSD (3GPP TS 27.007 §7.15: the USSD screens; a string
  spanning several lines is joined), +CMTI (TS 27.005: an SMS was stored; the session
  reads it with AT+CMGR and deletes it with AT+CMGD by itself), +CMT (an SMS delivered
  directly, its text on the next line). Anything else (RING, ^RSSI, +CREG, a stray OK)
  comes out as `Unsolicited` for the adapter to log; nothing the modem sends raises.
* The USSD string encodings real modems use (`UssdEncoding`): plain text under
  AT+CSCS="IRA"; packed GSM 7-bit as hex (many Huawei/ZTE sticks:
  `AT+CUSD=1,"AA180C3602",15` is *100#); UCS2 as hex under AT+CSCS="UCS2". Requests go
  with <dcs> 15 (GSM 7-bit, language unspecified). Answers are decoded by their <dcs>
  (TS 23.038 §5, the CBS coding USSD uses): UCS2 and 8-bit strings are hex octets
  whatever the encoding (27.007 §7.15); GSM 7-bit strings are in the session's encoding.

AT has no command tags: a final result code that comes after its command timed out
is taken for the next command's. The timeouts are long enough for that to be rare.

It does no IO and reads no clock: the adapter queues commands (`command`,
`ussd_send`, `ussd_cancel`, `sms_send`), writes `data_to_send()`, feeds what it reads
to `receive_data(data, now_s)` and calls `tick(now_s)` at `next_deadline_s()`.

The command in flight, the only state worth a table:

    (phase, input)                    -> phase, action
    (idle, command queued)            -> sent, write "<command>\\r"
    (sent, "> " prompt) [AT+CMGS]     -> body sent, write "<text>\\x1a"
    (sent | body sent, final code)    -> idle, emit CommandOk / CommandError
    (sent | body sent, deadline)      -> idle, emit CommandTimeout (AT+CMGS: write ESC)
"""

from __future__ import annotations

import contextlib
import enum
import string
from collections import deque
from dataclasses import dataclass, field

from extrabalance.smpp.text import (
    DC_USSD_GSM7,
    TextCodingError,
    gsm7_decode,
    gsm7_encode,
    pack_septets,
    ucs2_decode,
    unpack_septets,
)

LINE_MAX_BYTES = 4096  # one line from the modem; a longer run without a line end is dropped
CUSD_LINES_MAX = 32  # lines one multi-line +CUSD string may span
SMS_LINES_MAX = 64  # lines of one SMS text read with AT+CMGR
COMMANDS_QUEUED_MAX = 16  # commands waiting behind the one in flight
COMMAND_TIMEOUT_S = 5.0  # a command's final result code, unless the command says otherwise
SMS_SEND_TIMEOUT_S = 60.0  # AT+CMGS waits for the network (27.005 allows long waits)

CR = 0x0D
CTRL_Z = b"\x1a"  # ends the text of AT+CMGS
ESC = b"\x1b"  # abandons the text of AT+CMGS

_HEX_DIGITS = frozenset(string.hexdigits)
_ERROR_FINALS = frozenset({
    "ERROR", "NO CARRIER", "NO DIALTONE", "BUSY", "NO ANSWER",
    "COMMAND NOT SUPPORT", "TOO MANY PARAMETERS",  # Huawei's own
})


class UssdEncoding(enum.Enum):
    """How the USSD string travels between the terminal and the modem."""

    TEXT = "text"  # characters, AT+CSCS="IRA"
    GSM7_HEX = "gsm7-hex"  # packed GSM 7-bit septets, as hex (Huawei, ZTE)
    UCS2_HEX = "ucs2-hex"  # UTF-16BE as hex, AT+CSCS="UCS2"

    @property
    def charset(self) -> str:
        """The TE character set (AT+CSCS) this encoding goes with."""
        return "UCS2" if self is UssdEncoding.UCS2_HEX else "IRA"


class UssdStatus(enum.IntEnum):
    """<m> of +CUSD (27.007 §7.15)."""

    DONE = 0  # no further user action required
    MENU = 1  # further user action required
    TERMINATED = 2  # USSD terminated by network
    OTHER_CLIENT = 3  # other local client has responded
    NOT_SUPPORTED = 4  # operation not supported
    TIMED_OUT = 5  # network time out


class Alphabet(enum.Enum):
    GSM7 = "gsm7"
    EIGHT_BIT = "8bit"
    UCS2 = "ucs2"
    COMPRESSED = "compressed"  # TS 23.042; not decoded, shown as sent


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandOk:
    command_id: int
    command: str
    lines: tuple[str, ...]  # information lines of the response


@dataclass(frozen=True, slots=True)
class CommandError:
    command_id: int
    command: str
    result: str  # the final result code as sent: "ERROR", "+CME ERROR: 30", ...
    code: int | None  # the number of +CME / +CMS ERROR when numeric

    def describe(self) -> str:
        """The result code with its meaning when it is a common one."""
        meaning = None
        if self.code is not None:
            table = _CMS_MEANINGS if self.result.upper().startswith("+CMS") else _CME_MEANINGS
            meaning = table.get(self.code)
        return f"{self.result} ({meaning})" if meaning else self.result


@dataclass(frozen=True, slots=True)
class CommandTimeout:
    command_id: int
    command: str
    timeout_s: float


@dataclass(frozen=True, slots=True)
class UssdResult:
    """One +CUSD: the screen text decoded by its <dcs>, or None when there is none."""

    status: UssdStatus
    text: str | None
    dcs: int | None


@dataclass(frozen=True, slots=True)
class SmsReceived:
    sender: str
    text: str
    timestamp: str | None


@dataclass(frozen=True, slots=True)
class Unsolicited:
    """A line the session does not use (a result code it does not know, a stray OK)."""

    line: str


@dataclass(frozen=True, slots=True)
class Discarded:
    """Input the session had to drop: an over-long line, an SMS it could not fetch."""

    reason: str


Event = CommandOk | CommandError | CommandTimeout | UssdResult | SmsReceived | Unsolicited | Discarded

# The usual suspects when a USSD or SMS command fails (27.007 §9.2, 27.005 §3.2.5).
_CME_MEANINGS = {
    3: "operation not allowed", 4: "operation not supported", 10: "SIM not inserted",
    11: "SIM PIN required", 13: "SIM failure", 14: "SIM busy", 30: "no network service",
    31: "network timeout", 100: "unknown",
}
_CMS_MEANINGS = {
    38: "network out of order", 302: "operation not allowed", 310: "SIM not inserted",
    321: "invalid memory index", 322: "SIM memory full", 330: "SMSC address unknown",
    331: "no network service", 332: "network timeout", 500: "unknown error",
}


# --- text codings ----------------------------------------------------------------------


def cbs_alphabet(dcs: int) -> Alphabet:
    """The alphabet of a CBS/USSD data coding scheme (TS 23.038 §5). Reserved codings
    are GSM 7-bit, as the spec says a receiver shall assume."""
    group = dcs >> 4
    if group == 0x1:
        return Alphabet.UCS2 if dcs == 0x11 else Alphabet.GSM7
    if group in (0x4, 0x5, 0x6, 0x7, 0x9):  # general data coding, message with UDH
        if group != 0x9 and dcs & 0x20:
            return Alphabet.COMPRESSED
        return _ALPHABET_BITS[(dcs >> 2) & 0x3]
    if group == 0xF:
        return Alphabet.EIGHT_BIT if dcs & 0x04 else Alphabet.GSM7
    if group == 0xE:  # defined by the WAP Forum: data, not text
        return Alphabet.EIGHT_BIT
    return Alphabet.GSM7


def sms_alphabet(dcs: int) -> Alphabet:
    """The alphabet of an SMS data coding scheme (TS 23.038 §4)."""
    group = dcs >> 4
    if group <= 0x7:  # general data coding (0x4-0x7: marked for automatic deletion)
        if dcs & 0x20:
            return Alphabet.COMPRESSED
        return _ALPHABET_BITS[(dcs >> 2) & 0x3]
    if group == 0xE:
        return Alphabet.UCS2
    if group == 0xF:
        return Alphabet.EIGHT_BIT if dcs & 0x04 else Alphabet.GSM7
    return Alphabet.GSM7  # 0xC/0xD message waiting (GSM 7-bit) and reserved groups


_ALPHABET_BITS = (Alphabet.GSM7, Alphabet.EIGHT_BIT, Alphabet.UCS2, Alphabet.GSM7)


def pack_ussd(text: str) -> bytes:
    """Text as packed GSM 7-bit septets with the CBS/USSD padding (TS 23.038
    §6.1.2.3.1): 7 spare bits at the end carry a CR, not zeros, and a CR that ends
    exactly on an octet boundary gets a second CR. Raises TextCodingError."""
    septets = gsm7_encode(text)
    if len(septets) % 8 == 7 or (len(septets) % 8 == 0 and septets and septets[-1] == CR):
        septets += b"\r"
    return pack_septets(septets)


def unpack_ussd(octets: bytes) -> str:
    """Packed GSM 7-bit septets to text, without the CR that fills 7 spare bits."""
    septets = unpack_septets(octets)
    if len(octets) % 7 == 0 and septets and septets[-1] == CR:
        septets = septets[:-1]
    return gsm7_decode(septets)


def hex_octets(text: str) -> bytes | None:
    """The octets of an even-length string of hex digits, else None."""
    if not text or len(text) % 2 or not _HEX_DIGITS.issuperset(text):
        return None
    return bytes.fromhex(text)


def encode_ussd(text: str, encoding: UssdEncoding) -> str:
    """The <str> of AT+CUSD for `text`. Raises TextCodingError when it cannot go."""
    if encoding is UssdEncoding.GSM7_HEX:
        return pack_ussd(text).hex().upper()
    if encoding is UssdEncoding.UCS2_HEX:
        return text.encode("utf-16-be").hex().upper()
    if not text.isascii() or not text.isprintable() or '"' in text:
        raise TextCodingError(
            f"{text!r} cannot be sent as plain text (ASCII without quotes only); "
            "try --ussd-encoding ucs2-hex"
        )
    return text


def decode_ussd(raw: str, dcs: int | None, encoding: UssdEncoding) -> str:
    """The text of a +CUSD <str> by its <dcs> (27.007 default 0). A string that is
    not in the expected form is shown as sent rather than dropped."""
    dcs = 0 if dcs is None else dcs
    alphabet = cbs_alphabet(dcs)
    if alphabet is Alphabet.COMPRESSED:
        return raw
    if alphabet is not Alphabet.GSM7:  # 27.007 §7.15: hex octets whatever AT+CSCS says
        octets = hex_octets(raw)
        if octets is None:
            return _newlines(raw)
        if alphabet is Alphabet.EIGHT_BIT:
            return _newlines(octets.decode("latin-1"))
        if dcs == 0x11:  # two GSM 7-bit characters of language in two octets first
            octets = octets[2:]
        return _newlines(ucs2_decode(octets))
    text = _in_charset(raw, encoding)
    if dcs == 0x10 and len(text) >= 3 and text[2] in "\r\n":  # language, CR, message
        text = text[3:]
    return _newlines(text)


def _in_charset(raw: str, encoding: UssdEncoding) -> str:
    """A GSM 7-bit <str> as the modem renders it in `encoding`."""
    if encoding is UssdEncoding.TEXT:
        return raw
    octets = hex_octets(raw)
    if octets is None:  # the modem answered in text after all
        return raw
    if encoding is UssdEncoding.GSM7_HEX:
        return unpack_ussd(octets)
    return ucs2_decode(octets)


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_fields(text: str) -> list[str]:
    """Comma-separated parameters of a result code; commas inside quotes do not split
    (`"24/05/01,10:00:00+08"`). Quotes are removed, spaces around fields too."""
    fields: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            fields.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    fields.append("".join(current).strip())
    return fields


def parse_cusd(payload: str) -> tuple[int, str | None, int | None] | None:
    """(<m>, <str> or None, <dcs> or None) of the text after "+CUSD:"; None when it is
    not one. The closing quote of <str> is the last one, so a string may hold commas
    and quotes."""
    m_text, comma, rest = payload.partition(",")
    try:
        m = int(m_text.strip())
    except ValueError:
        return None
    if not comma:
        return m, None, None
    rest = rest.strip()
    if rest.startswith('"'):
        close = rest.rfind('"')
        if close == 0:
            return None
        raw, tail = rest[1:close], rest[close + 1:].lstrip(" ,")
    else:  # an unquoted string (some firmware): the last field is the dcs if numeric
        raw, _, tail = rest.rpartition(",")
        if not tail.strip().isdigit():
            raw, tail = rest, ""
    dcs = int(tail) if tail.strip().isdigit() and int(tail) <= 0xFF else None
    return m, raw, dcs


# --- the session -------------------------------------------------------------------------


@dataclass(slots=True)
class _Command:
    command_id: int
    line: str
    timeout_s: float
    body: bytes | None = None  # AT+CMGS: the text written after the "> " prompt
    sms_index: int | None = None  # AT+CMGR issued on +CMTI: read it, then delete it
    deadline_s: float = 0.0
    body_sent: bool = False
    lines: list[str] = field(default_factory=list)

    @property
    def response_prefix(self) -> str | None:
        """"+CMGR:" for "AT+CMGR=3"; None for a basic command (ATI: any line)."""
        upper = self.line.upper()
        if not upper.startswith("AT+"):
            return None
        name = upper[3:].split("=", 1)[0].split("?", 1)[0]
        return f"+{name}:"


class AtSession:
    """One modem's AT session. Not thread-safe; every method returns at once."""

    def __init__(
        self,
        encoding: UssdEncoding = UssdEncoding.TEXT,
        *,
        line_max_bytes: int = LINE_MAX_BYTES,
        commands_queued_max: int = COMMANDS_QUEUED_MAX,
        command_timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> None:
        self.encoding = encoding
        self.line_max_bytes = line_max_bytes
        self.commands_queued_max = commands_queued_max
        self.command_timeout_s = command_timeout_s
        self._rx = bytearray()
        self._tx = bytearray()
        self._queue: deque[_Command] = deque()
        self._current: _Command | None = None
        self._next_id = 1
        self._cusd_lines: list[str] | None = None  # a +CUSD string not closed yet
        self._cmt_header: str | None = None  # a +CMT waiting for its text line
        self.discarded_count = 0

    # -- commands ---------------------------------------------------------------------

    def command(
        self, line: str, now_s: float, *, timeout_s: float | None = None,
        body: bytes | None = None,
    ) -> int:
        """Queue an AT command line (without CR); returns its command_id. Raises
        OverflowError when `commands_queued_max` are already waiting."""
        if any(ch in line for ch in "\r\n\x1a\x1b"):
            raise ValueError(f"control character in AT command {line!r}")
        return self._enqueue(line, now_s, timeout_s=timeout_s, body=body)

    def _enqueue(
        self, line: str, now_s: float, *, timeout_s: float | None = None,
        body: bytes | None = None, sms_index: int | None = None,
    ) -> int:
        if len(self._queue) >= self.commands_queued_max:
            raise OverflowError(f"{self.commands_queued_max} AT commands already waiting")
        command = _Command(
            self._next_id, line, self.command_timeout_s if timeout_s is None else timeout_s,
            body=body, sms_index=sms_index,
        )
        self._next_id += 1
        self._queue.append(command)
        self._start_next(now_s)
        return command.command_id

    def ussd_send(self, text: str, now_s: float, *, timeout_s: float | None = None) -> int:
        """Dial a USSD code or answer the menu on screen (AT+CUSD=1,<str>,15). The
        screen comes later as a UssdResult. Raises TextCodingError."""
        encoded = encode_ussd(text, self.encoding)
        return self.command(f'AT+CUSD=1,"{encoded}",{DC_USSD_GSM7}', now_s, timeout_s=timeout_s)

    def ussd_cancel(self, now_s: float) -> int:
        """End the USSD dialog from the terminal side (AT+CUSD=2)."""
        return self.command("AT+CUSD=2", now_s)

    def sms_send(self, to: str, text: str, now_s: float) -> int:
        """Send an SMS in text mode (AT+CMGF=1 first). Raises TextCodingError."""
        if any(ch in text for ch in "\x1a\x1b"):
            raise TextCodingError("an SMS cannot hold Ctrl-Z or Esc in text mode")
        if self.encoding is UssdEncoding.UCS2_HEX:
            to, text = encode_ussd(to, self.encoding), encode_ussd(text, self.encoding)
        elif not text.isascii() or not to.lstrip("+").isdigit():
            raise TextCodingError("SMS in IRA text mode: ASCII only; try --ussd-encoding ucs2-hex")
        return self.command(
            f'AT+CMGS="{to}"', now_s, timeout_s=SMS_SEND_TIMEOUT_S, body=text.encode("ascii")
        )

    def data_to_send(self) -> bytes:
        """Bytes to write to the modem now (and forget)."""
        data, self._tx = bytes(self._tx), bytearray()
        return data

    def next_deadline_s(self) -> float | None:
        return None if self._current is None else self._current.deadline_s

    def tick(self, now_s: float) -> list[Event]:
        """Time out the command in flight when its deadline has passed."""
        current = self._current
        if current is None or now_s < current.deadline_s:
            return []
        if current.body is not None and not current.body_sent:
            self._tx += ESC  # the modem may still sit at the "> " prompt
        self._current = None
        self._start_next(now_s)
        return [CommandTimeout(current.command_id, current.line, current.timeout_s)]

    # -- input ------------------------------------------------------------------------

    def receive_data(self, data: bytes, now_s: float) -> list[Event]:
        """Feed bytes read from the modem; returns what they meant."""
        self._rx += data
        events: list[Event] = []
        while (end := self._rx.find(b"\n")) >= 0:
            raw = bytes(self._rx[:end])
            del self._rx[:end + 1]
            if len(raw) > self.line_max_bytes:
                events.append(self._discard(f"a line of {len(raw)} bytes"))
                continue
            events += self._line(raw.strip(b"\r").decode("latin-1"), now_s)
        current = self._current
        if (
            current is not None and current.body is not None and not current.body_sent
            and self._rx.strip(b"\r\n ") == b">"
        ):
            self._rx.clear()
            self._tx += current.body + CTRL_Z
            current.body_sent = True
        if len(self._rx) > self.line_max_bytes:
            events.append(self._discard(f"{len(self._rx)} bytes without a line end"))
            self._rx.clear()
        return events

    def _discard(self, what: str) -> Discarded:
        self.discarded_count += 1
        return Discarded(f"{what} (over {self.line_max_bytes})")

    def _line(self, line: str, now_s: float) -> list[Event]:
        if self._cusd_lines is not None:
            return self._cusd_continued(line)
        if self._cmt_header is not None:
            header, self._cmt_header = self._cmt_header, None
            return [self._sms_delivered(header, line)]
        current = self._current
        upper = line.upper()
        reading_sms = current is not None and current.sms_index is not None and current.lines
        if reading_sms and upper != "OK" and not _is_error_final(upper):
            assert current is not None
            current.lines.append(line)  # the SMS text, blank lines included
            if len(current.lines) > SMS_LINES_MAX + 1:
                current.lines.pop()
            return []
        if not line:
            return []
        if current is not None and line == current.line:
            return []  # echo: ATE0 not in effect yet
        if upper == "OK":
            return self._final(now_s, None)
        if _is_error_final(upper):
            return self._final(now_s, line)
        if upper.startswith("+CUSD:"):
            return self._cusd(line)
        if upper.startswith("+CMTI:"):
            return self._sms_stored(line, now_s)
        if upper.startswith("+CMT:"):
            self._cmt_header = line[len("+CMT:"):]
            return []
        if current is not None:
            prefix = current.response_prefix
            if prefix is None or upper.startswith(prefix):
                current.lines.append(line)
                return []
        return [Unsolicited(line)]

    def _final(self, now_s: float, error: str | None) -> list[Event]:
        current = self._current
        if current is None:
            return [Unsolicited(error or "OK")]
        self._current = None
        events: list[Event] = []
        if error is None:
            events.append(CommandOk(current.command_id, current.line, tuple(current.lines)))
            if current.sms_index is not None:
                events += self._sms_read(current, now_s)
        else:
            code_text = error.rpartition(":")[2].strip()
            code = int(code_text) if ":" in error and code_text.isdigit() else None
            events.append(CommandError(current.command_id, current.line, error, code))
        self._start_next(now_s)
        return events

    def _start_next(self, now_s: float) -> None:
        if self._current is not None or not self._queue:
            return
        command = self._queue.popleft()
        command.deadline_s = now_s + command.timeout_s
        self._current = command
        self._tx += command.line.encode("latin-1") + b"\r"

    # -- USSD -------------------------------------------------------------------------

    def _cusd(self, line: str) -> list[Event]:
        payload = line[len("+CUSD:"):]
        _, comma, rest = payload.partition(",")
        if comma and rest.strip().startswith('"') and rest.count('"') == 1:
            self._cusd_lines = [line]  # the string goes on over the next lines
            return []
        return self._ussd_result(line, payload)

    def _cusd_continued(self, line: str) -> list[Event]:
        assert self._cusd_lines is not None
        self._cusd_lines.append(line)
        if '"' in line:
            joined, self._cusd_lines = "\n".join(self._cusd_lines), None
            return self._ussd_result(joined, joined[len("+CUSD:"):])
        if len(self._cusd_lines) > CUSD_LINES_MAX:
            self._cusd_lines = None
            return [self._discard(f"a +CUSD string over {CUSD_LINES_MAX} lines")]
        return []

    def _ussd_result(self, line: str, payload: str) -> list[Event]:
        parsed = parse_cusd(payload)
        if parsed is None:
            return [Unsolicited(line)]
        m, raw, dcs = parsed
        try:
            status = UssdStatus(m)
        except ValueError:
            return [Unsolicited(line)]
        text = None if raw is None else decode_ussd(raw, dcs, self.encoding)
        return [UssdResult(status, text, dcs)]

    # -- SMS --------------------------------------------------------------------------

    def _sms_stored(self, line: str, now_s: float) -> list[Event]:
        fields = split_fields(line[len("+CMTI:"):])
        if len(fields) < 2 or not fields[1].isdigit():
            return [Unsolicited(line)]
        index = int(fields[1])
        try:
            self._enqueue(f"AT+CMGR={index}", now_s, sms_index=index)
        except OverflowError:
            return [self._discard(f"SMS {index} left unread: AT command queue full")]
        return []

    def _sms_read(self, command: _Command, now_s: float) -> list[Event]:
        """AT+CMGR answered: the SMS, and AT+CMGD to free its slot."""
        if not command.lines:
            return []
        header = command.lines[0][len("+CMGR:"):]
        # <stat>,<oa>,[<alpha>],<scts>[,<tooa>,<fo>,<pid>,<dcs>,...] (AT+CSDH=1)
        fields = split_fields(header)
        text = "\n".join(command.lines[1:]).rstrip("\n")
        event = self._sms(fields[1:2], fields[3:4], fields[7:8], text)
        with contextlib.suppress(OverflowError):  # left on the SIM: no harm but space
            self._enqueue(f"AT+CMGD={command.sms_index}", now_s)
        return [event]

    def _sms_delivered(self, header: str, text: str) -> SmsReceived:
        # +CMT: <oa>,[<alpha>],<scts>[,<tooa>,<fo>,<pid>,<dcs>,...]
        fields = split_fields(header)
        return self._sms(fields[0:1], fields[2:3], fields[6:7], text)

    def _sms(
        self, sender: list[str], timestamp: list[str], dcs: list[str], raw: str
    ) -> SmsReceived:
        ucs2_charset = self.encoding is UssdEncoding.UCS2_HEX
        alphabet = sms_alphabet(int(dcs[0]) & 0xFF) if dcs and dcs[0].isdigit() else None
        text = raw
        if alphabet in (Alphabet.UCS2, Alphabet.EIGHT_BIT) or ucs2_charset:
            octets = hex_octets(raw)
            if octets is not None:
                text = (octets.decode("latin-1") if alphabet is Alphabet.EIGHT_BIT
                        else ucs2_decode(octets))
        address = sender[0] if sender else ""
        if ucs2_charset and (octets := hex_octets(address)) is not None:
            address = ucs2_decode(octets)
        return SmsReceived(address, _newlines(text), timestamp[0] if timestamp else None)


def _is_error_final(upper: str) -> bool:
    return upper in _ERROR_FINALS or upper.startswith(("+CME ERROR:", "+CMS ERROR:"))
