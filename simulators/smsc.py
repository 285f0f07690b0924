"""The SMSC / USSD gateway simulator: the SMPP server role the node binds to.

What this file owns
-------------------
* `SmscSimulator`: an SMPP 3.4 server (the node is its ESME) that checks bind
  credentials, records every MT submit_sm for checks (`mt()`), routes USSD screens to
  the virtual handset waiting on that dialog, delivers MT SMS to handsets' inboxes,
  sends MO SMS and USSD input as deliver_sm, optionally sends delivery receipts, and
  injects throttling (ESME_RTHROTTLED on a share of submits) or drops the binds.
* Dialog ids: `its_session_info` session numbers per MSISDN (0..255, wrapping, never
  reusing one still open) or `user_message_reference` (0..65535), by flag.
* The control channel (JSON lines on loopback) that `extrabalance phone` uses to drive
  a handset living in this process, and the `extrabalance sim smsc` entry point.

USSD wire conventions (PROTOCOLS.md): input goes out as deliver_sm with service_type
`USSD`, source_addr = MSISDN, ussd_service_op 1 (PSSR indication, new dialog) or 18
(USSR confirm, reply in a dialog), the dialog id TLV; screens come back as submit_sm
with ussd_service_op 2 (USSR request: a menu) or 17 (PSSR response: final), the
dialog id echoed and, for its_session_info, the end bit set on the final screen.
The SMPP protocol itself is the shared stack in `extrabalance.smpp`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import itertools
import json
import random
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from simulators.handset import CONTROL_LINE_MAX, Handset, HandsetError, Screen, ScreenTimeout

CONTROL_PORT_DEFAULT = 2776
MT_RECORDS_MAX = 1_000_000  # MT messages kept for checks; the oldest are forgotten
HANDSETS_MAX = 1_000_000  # virtual handsets attached at once
OPEN_DIALOGS_MAX = 100_000  # USSD dialogs awaiting a screen at once
RECEIPT_DELAY_MS = 20  # a delivery receipt follows its submit_sm after this long
CONTROL_CLIENTS_MAX = 64  # phones attached over the control channel at once

USSD_OP_PSSR_INDICATION = 1
USSD_OP_PSSR_RESPONSE = 17
USSD_OP_USSR_REQUEST = 2
USSD_OP_USSR_CONFIRM = 18
USSD_ABORT_OP_DEFAULT = 0x81


class DialogIdMode(enum.Enum):
    ITS_SESSION_INFO = "its_session_info"
    USER_MESSAGE_REFERENCE = "user_message_reference"


class DialogIds:
    """Allocates dialog ids per MSISDN; never hands out one that is still open."""

    def __init__(self, mode: DialogIdMode) -> None:
        self.mode = mode
        self.space = 256 if mode is DialogIdMode.ITS_SESSION_INFO else 65536
        self._next: dict[str, int] = {}
        self._open: set[tuple[str, int]] = set()

    def allocate(self, msisdn: str) -> int:
        start = self._next.get(msisdn, 0)
        for step in range(self.space):
            candidate = (start + step) % self.space
            if (msisdn, candidate) not in self._open:
                self._next[msisdn] = (candidate + 1) % self.space
                self._open.add((msisdn, candidate))
                return candidate
        raise HandsetError(f"all {self.space} dialog ids of {msisdn} are open")

    def release(self, msisdn: str, dialog_id: int) -> None:
        self._open.discard((msisdn, dialog_id))

    def is_open(self, msisdn: str, dialog_id: int) -> bool:
        return (msisdn, dialog_id) in self._open


@dataclass(frozen=True, slots=True)
class MtRecord:
    """One MT submit_sm as the SMSC received it."""

    msisdn: str  # destination_addr
    source_addr: str
    text: str  # decoded (reassembled for concatenated SMS: see `parts`)
    is_ussd: bool
    ussd_service_op: int | None
    dialog_id: int | None
    end: bool  # final USSD screen (op 17 or the its_session_info end bit)
    data_coding: int
    registered_delivery: int
    message_id: str
    system_id: str
    time_s: float  # wall clock, seconds since the epoch
    parts: int = 1  # segments this record is (1 unless concatenated)


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[Screen]
    sequence_number: int = 0


class SmscSimulator:
    """SMPP server for the node plus the handsets of the virtual subscribers."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        system_id: str = "extrabalance",
        password: str = "secret",
        short_code: str = "1234",
        ussd_service_type: str = "USSD",
        dialog_id_mode: DialogIdMode | str = DialogIdMode.ITS_SESSION_INFO,
        ussd_abort_op: int = USSD_ABORT_OP_DEFAULT,
        delivery_receipts: bool = False,
        throttle_share: float = 0.0,
        control_port: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.system_id = system_id
        self.password = password
        self.short_code = short_code
        self.ussd_service_type = ussd_service_type
        self.dialog_id_mode = DialogIdMode(dialog_id_mode)
        self.ussd_abort_op = ussd_abort_op
        self.delivery_receipts = delivery_receipts
        self.control_port = control_port
        self._rng = random.Random(seed)
        self._throttle_share = 0.0
        self.set_throttle(throttle_share)
        self._dialogs = DialogIds(self.dialog_id_mode)
        self._waiting: dict[tuple[str, int], _Waiter] = {}
        self._handsets: dict[str, Handset] = {}
        self._mt: deque[MtRecord] = deque(maxlen=MT_RECORDS_MAX)
        self._message_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._concat: dict[tuple[str, int], dict[int, str]] = {}
        self._server: object | None = None
        self._control: asyncio.AbstractServer | None = None
        self.stats: dict[str, int] = {
            "mt_sms": 0,
            "mt_ussd": 0,
            "throttled": 0,
            "orphan_screens": 0,  # a screen for a dialog nobody waits on (late, unknown)
            "mo_sms": 0,
            "ussd_in": 0,
            "receipts": 0,
            "deliver_failed": 0,
        }

    # -- lifecycle: see the SMPP glue section below ------------------------------------

    # -- what tests check ---------------------------------------------------------------

    def mt(self, msisdn: str | None = None) -> list[MtRecord]:
        """Every MT message received (optionally only those to `msisdn`), oldest first."""
        return [r for r in self._mt if msisdn is None or r.msisdn == msisdn]

    def mt_sms(self, msisdn: str | None = None) -> list[MtRecord]:
        return [r for r in self.mt(msisdn) if not r.is_ussd]

    def set_throttle(self, share: float) -> None:
        """Answer this share of submit_sm with ESME_RTHROTTLED (not recorded, not delivered)."""
        if not 0.0 <= share <= 1.0:
            raise ValueError("throttle share must be within 0..1")
        self._throttle_share = share

    # -- handsets ----------------------------------------------------------------------

    def attach(self, handset: Handset) -> None:
        if handset.msisdn not in self._handsets and len(self._handsets) >= HANDSETS_MAX:
            raise HandsetError(f"more than {HANDSETS_MAX} handsets")
        self._handsets[handset.msisdn] = handset

    def detach(self, handset: Handset) -> None:
        if self._handsets.get(handset.msisdn) is handset:
            del self._handsets[handset.msisdn]

    def handset(self, msisdn: str) -> Handset:
        """The handset of `msisdn`, created on first use."""
        existing = self._handsets.get(msisdn)
        return existing if existing is not None else Handset(self, msisdn)

    def handsets(self) -> Iterator[Handset]:
        return iter(list(self._handsets.values()))
