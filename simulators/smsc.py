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
* Which bind carries what, when several binds (of one node or of several nodes,
  docs/scale-out.md) are up: a new USSD dialog goes to the next bind in turn and keeps
  it for all its inputs; when that bind has gone, the next input goes to another bind,
  and an input whose bind went away before it was answered is delivered once more on
  another (a real gateway does both). An MO SMS goes to the next bind in turn, all its
  parts on the same one. `dialogs_moved` and `inputs_redelivered` count the moves.
* The control channel (JSON lines on loopback) that `extrabalance phone` uses to drive
  a handset living in this process, and the `extrabalance sim smsc` entry point.

USSD wire conventions (docs/protocols.md): input goes out as deliver_sm with service_type
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
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

from extrabalance.argparsing import Parser
from extrabalance.clock import SYSTEM_CLOCK
from extrabalance.smpp.aio.connection import RequestFailedError
from extrabalance.smpp.aio.server import Smsc
from extrabalance.smpp.pdu import DeliverSm, ItsSessionInfo, Status, SubmitSm, Tag
from extrabalance.smpp.text import (
    ConcatInfo,
    Reassembler,
    decode_text,
    parse_concat,
    split_text,
)
from extrabalance.smpp.ussd import ussd_deliver
from simulators.handset import CONTROL_LINE_MAX, Handset, HandsetError, Screen, ScreenTimeout

CONTROL_PORT_DEFAULT = 2776
MT_RECORDS_MAX = 1_000_000  # MT messages kept for checks; the oldest are forgotten
HANDSETS_MAX = 1_000_000  # virtual handsets attached at once
OPEN_DIALOGS_MAX = 100_000  # USSD dialogs awaiting a screen at once
RECEIPT_DELAY_MS = 20  # a delivery receipt follows its submit_sm after this long
CONTROL_CLIENTS_MAX = 64
SMSC_WINDOW_MAX = 100
DROP_WAIT_S = 2.0  # drop_binds() waits at most this long for the connections to go  # deliver_sm awaiting the node's response, per bind
CONCAT_PENDING_MAX = 10_000  # concatenated MT SMS awaiting their missing parts
CONCAT_TIMEOUT_S = 60.0  # a part waits this long for the others  # phones attached over the control channel at once

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
    bind: Any = None  # the bind (server-side connection) this dialog's inputs go to


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
        repeat_share: float = 0.0,
        submit_resp_delay_s: float = 0.0,
        enquire_link_s: float = 30.0,
        its_sequence: str = "increment",
        more_binds: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.system_id = system_id
        self.password = password
        # Other ESMEs allowed to bind (system_id -> password): several nodes, each its
        # own system_id, as a gateway gives each of its clients.
        self.more_binds = dict(more_binds or {})
        self.short_code = short_code
        self.ussd_service_type = ussd_service_type
        self.dialog_id_mode = DialogIdMode(dialog_id_mode)
        self.ussd_abort_op = ussd_abort_op
        self.delivery_receipts = delivery_receipts
        self.control_port = control_port
        self._rng = random.Random(seed)
        # Real gateways' habits (docs/smpp.md, "Gateways as they really behave"):
        # repeat this share of USSD inputs and MO SMS under a new sequence number,
        # answer every submit_sm this late, poll enquire_link every enquire_link_s
        # whatever the traffic, and expect our its_session_info sequence to be the
        # input's + 1 ("increment") or the input's ("echo"); mismatches are counted.
        if not 0.0 <= repeat_share <= 1.0:
            raise ValueError("repeat share must be within 0..1")
        self.repeat_share = repeat_share
        self.submit_resp_delay_s = submit_resp_delay_s
        self.enquire_link_s = enquire_link_s
        self.its_sequence = its_sequence
        self._throttle_share = 0.0
        self.set_throttle(throttle_share)
        self._dialogs = DialogIds(self.dialog_id_mode)
        self._waiting: dict[tuple[str, int], _Waiter] = {}
        self._handsets: dict[str, Handset] = {}
        self._mt: deque[MtRecord] = deque(maxlen=MT_RECORDS_MAX)
        self._message_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

        self._reassembler = Reassembler(entries_max=CONCAT_PENDING_MAX, timeout_s=CONCAT_TIMEOUT_S)
        self._server: Any = None
        self._control: asyncio.AbstractServer | None = None
        self._control_clients = 0
        self.stats: dict[str, int] = {
            "mt_sms": 0,
            "mt_ussd": 0,
            "throttled": 0,
            "orphan_screens": 0,  # a screen for a dialog nobody waits on (late, unknown)
            "mo_sms": 0,
            "ussd_in": 0,
            "receipts": 0,
            "deliver_failed": 0,
            "screen_timeouts": 0,
            "repeats_sent": 0,  # inputs and MO SMS sent twice (new sequence number)
            "its_sequence_mismatch": 0,  # screens whose its_session_info sequence was unexpected
            "screens_after_final": 0,  # screens for a dialog whose final screen came already
            "dialogs_moved": 0,  # inputs sent on another bind: the dialog's bind had gone
            "inputs_redelivered": 0,  # inputs delivered again on another bind (theirs died)
        }
        self._bind_turn = itertools.count()
        self._ended_dialogs: deque[tuple[str, int]] = deque(maxlen=OPEN_DIALOGS_MAX)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> int:
        """Listen for the node's binds (and the control channel when a port was given).

        Returns the SMPP port (useful with port=0).
        """

        # _on_submit answers at once: the server sends the submit_sm_resp in the turn
        # it read the submit_sm, without a task per PDU.
        self._server = Smsc(
            credentials={self.system_id: self.password, **self.more_binds},
            on_submit=self._on_submit_late,
            system_id="smsc-sim",
            window_max=SMSC_WINDOW_MAX,
            enquire_link_s=self.enquire_link_s,
            enquire_link_periodic=True,
        )
        self.port = await self._server.listen(self.host, self.port)
        if self.control_port is not None:
            self._control = await asyncio.start_server(
                self._control_client, self.host, self.control_port, limit=CONTROL_LINE_MAX
            )
            self.control_port = self._control.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        for task in list(self._tasks):
            task.cancel()
        for waiter in self._waiting.values():
            if not waiter.future.done():
                waiter.future.cancel()
        self._waiting.clear()
        if self._server is not None:
            server, self._server = self._server, None
            await _maybe_await(server.close())

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def wait_bound(self, timeout_s: float = 5.0) -> None:
        """Wait until the node has a bind that can receive deliver_sm."""
        server = self._require_server()
        async with asyncio.timeout(timeout_s):
            while not _bound_receivers(server):
                await asyncio.sleep(0.01)

    def is_bound(self) -> bool:
        return self._server is not None and bool(_bound_receivers(self._server))

    async def drop_binds(self) -> int:
        """Close every bind of the node at once (a gateway restart); returns how many."""
        return await _drop_binds(self._require_server())

    def _require_server(self) -> Any:
        if self._server is None:
            raise RuntimeError("SmscSimulator is not started")
        return self._server

    async def _deliver(self, pdu: Any, *, system_id: str | None = None, bind: Any = None) -> int:
        server = self._require_server()

        try:
            status = await server.deliver(pdu, system_id=system_id, connection=bind)
        except (RequestFailedError, ConnectionError, LookupError) as exc:
            self.stats["deliver_failed"] += 1
            raise HandsetError(f"cannot deliver to the node: {exc}") from None
        return int(status)

    def binds(self) -> list[Any]:
        """The node binds that can take a deliver_sm now (server-side connections)."""
        return list(self._require_server().receivers())

    def _next_bind(self, avoid: Any = None) -> Any:
        """The next bind in turn (another than `avoid` when there is one), None if none."""
        live = self._require_server().receivers()
        others = [b for b in live if b is not avoid] or live
        if not others:
            return None
        return others[next(self._bind_turn) % len(others)]

    def _bind_alive(self, bind: Any) -> bool:
        return bind is not None and bind in self._require_server().receivers()

    def dialog_system_id(self, msisdn: str, dialog_id: int) -> str | None:
        """The system_id of the bind an open dialog's inputs go to (None: not open)."""
        waiter = self._waiting.get((msisdn, dialog_id))
        if waiter is None or waiter.bind is None:
            return None
        return str(waiter.bind.session.peer_system_id)

    async def drop_dialog_bind(self, msisdn: str, dialog_id: int) -> bool:
        """Cut the one bind an open dialog's inputs go to (the gateway's side of a
        broken link); False if the dialog is not open or its bind is gone already."""
        waiter = self._waiting.get((msisdn, dialog_id))
        if waiter is None or not self._bind_alive(waiter.bind):
            return False
        waiter.bind.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DROP_WAIT_S):
                while self._bind_alive(waiter.bind):
                    await asyncio.sleep(0.01)
        return True

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

    # -- handset → node: USSD and MO SMS as deliver_sm -----------------------------------

    def _dialog_id_kwargs(self, dialog_id: int, sequence_number: int) -> dict[str, Any]:
        if self.dialog_id_mode is DialogIdMode.ITS_SESSION_INFO:
            return {"session": ItsSessionInfo(dialog_id, sequence_number & 0x7F, False)}
        return {"user_message_reference": dialog_id}

    async def _ussd_send(
        self, msisdn: str, dialog_id: int, text: str, op: int, timeout_s: float
    ) -> Screen:
        key = (msisdn, dialog_id)
        waiter = self._waiting.get(key)
        if waiter is None:
            if len(self._waiting) >= OPEN_DIALOGS_MAX:
                raise HandsetError(f"more than {OPEN_DIALOGS_MAX} USSD dialogs open")
            waiter = _Waiter(asyncio.get_running_loop().create_future())
            self._waiting[key] = waiter
        else:
            waiter.future = asyncio.get_running_loop().create_future()
            waiter.sequence_number += 1
        pdu = ussd_deliver(
            msisdn, self.short_code, text, op=op, service_type=self.ussd_service_type,
            **self._dialog_id_kwargs(dialog_id, waiter.sequence_number),
        )
        self.stats["ussd_in"] += 1
        if waiter.bind is None:
            waiter.bind = self._next_bind()
        elif not self._bind_alive(waiter.bind):
            # The dialog's bind has gone (its node stopped, the link broke): the input
            # goes to another bind, as a gateway does; that node may not know the dialog.
            self.stats["dialogs_moved"] += 1
            waiter.bind = self._next_bind(avoid=waiter.bind)
        try:
            status = await self._deliver_input(pdu, waiter)
            if status != 0:
                raise HandsetError(f"the node refused the USSD input (status 0x{status:02x})")
            # One timer handle per screen (asyncio.timeout costs several times more,
            # and the wait is one future anyway).
            timer = asyncio.get_running_loop().call_later(timeout_s, _expire, waiter.future)
            try:
                screen = await waiter.future
            finally:
                timer.cancel()
        except TimeoutError:
            # Like a gateway whose dialog timer fired: tell the node the dialog is over.
            self.stats["screen_timeouts"] += 1
            abort = self._close_with_abort(msisdn, dialog_id)
            if abort is not None:
                self._spawn(self._deliver_quietly(*abort))
            raise ScreenTimeout(f"no USSD screen for {msisdn} within {timeout_s} s") from None
        except BaseException:
            self._end_dialog(msisdn, dialog_id)
            raise
        if screen.final:
            self._end_dialog(msisdn, dialog_id)
        return screen

    async def _deliver_input(self, pdu: Any, waiter: _Waiter) -> int:
        """Deliver a USSD input on its dialog's bind; if that bind went away before
        answering, once more on another bind (the node that had it may have read it)."""
        try:
            return await self._deliver_maybe_twice(pdu, waiter.bind)
        except HandsetError:
            if self._bind_alive(waiter.bind):
                raise
            other = self._next_bind(avoid=waiter.bind)
            if other is None or other is waiter.bind:
                raise
            self.stats["inputs_redelivered"] += 1
            waiter.bind = other
            return await self._deliver_maybe_twice(pdu, other)

    async def _deliver_maybe_twice(self, pdu: Any, bind: Any = None) -> int:
        """Deliver; for `repeat_share` of them, deliver the same PDU again at once (a
        new sequence number, as a gateway that missed our deliver_sm_resp does)."""
        if not self.repeat_share or self._rng.random() >= self.repeat_share:
            return await self._deliver(pdu, bind=bind)
        self.stats["repeats_sent"] += 1
        first, _again = await asyncio.gather(self._deliver(pdu, bind=bind),
                                             self._deliver(pdu, bind=bind),
                                             return_exceptions=True)
        if isinstance(first, BaseException):
            raise first
        return first

    def _end_dialog(self, msisdn: str, dialog_id: int) -> None:
        if self._waiting.pop((msisdn, dialog_id), None) is not None:
            self._ended_dialogs.append((msisdn, dialog_id))
        self._dialogs.release(msisdn, dialog_id)

    async def ussd_begin(
        self, msisdn: str, code: str, *, timeout_s: float = 10.0
    ) -> tuple[int, Screen]:
        """Open a dialog with `code` (PSSR indication); returns (dialog id, first screen)."""
        dialog_id = self._dialogs.allocate(msisdn)
        screen = await self._ussd_send(msisdn, dialog_id, code, USSD_OP_PSSR_INDICATION, timeout_s)
        return dialog_id, screen

    async def ussd_continue(
        self, msisdn: str, dialog_id: int, text: str, *, timeout_s: float = 10.0
    ) -> Screen:
        """The subscriber's reply inside an open dialog (USSR confirm); the next screen."""
        if (msisdn, dialog_id) not in self._waiting:
            raise HandsetError(f"dialog {dialog_id} of {msisdn} is not open")
        return await self._ussd_send(msisdn, dialog_id, text, USSD_OP_USSR_CONFIRM, timeout_s)

    async def ussd_abort(self, msisdn: str, dialog_id: int) -> None:
        """The subscriber (or the network) ends the dialog: deliver_sm with the abort op."""
        abort = self._close_with_abort(msisdn, dialog_id)
        if abort is not None:
            await self._deliver_quietly(*abort)

    def _close_with_abort(self, msisdn: str, dialog_id: int) -> tuple[Any, Any] | None:
        """Forget the dialog now; the abort deliver_sm to send and the bind to send it
        on (the dialog's, or any when that one has gone), or None if it was not open."""

        waiter = self._waiting.get((msisdn, dialog_id))
        if waiter is None:
            return None
        self._end_dialog(msisdn, dialog_id)
        pdu = ussd_deliver(
            msisdn, self.short_code, "", op=self.ussd_abort_op,
            service_type=self.ussd_service_type,
            **self._dialog_id_kwargs(dialog_id, waiter.sequence_number + 1),
        )
        return pdu, waiter.bind if self._bind_alive(waiter.bind) else None

    async def _deliver_quietly(self, pdu: Any, bind: Any = None) -> None:
        with contextlib.suppress(HandsetError, OSError, TimeoutError):
            await self._deliver(pdu, bind=bind)

    async def send_mo_sms(self, msisdn: str, text: str, *, to: str | None = None) -> int:
        """An SMS from the subscriber to the short code (deliver_sm, no USSD TLVs).

        Returns the ESME's command_status (0 = accepted). Long texts go as UDH parts.
        """

        self.stats["mo_sms"] += 1
        reference = next(self._message_ids) & 0xFF
        status = 0
        # Every part on one bind: the node that gets them joins them.
        bind = self._next_bind()
        for segment in split_text(text, reference):
            status = await self._deliver_maybe_twice(
                DeliverSm(
                    source_addr_ton=1,
                    source_addr_npi=1,
                    source_addr=msisdn,
                    destination_addr=to or self.short_code,
                    esm_class=segment.esm_class,
                    data_coding=segment.data_coding,
                    short_message=segment.short_message,
                ),
                bind,
            )
            if status != 0:
                break
        return status

    # -- node → handset: submit_sm ------------------------------------------------------

    def _on_submit(self, submit: object, system_id: str) -> tuple[int, str]:
        """Every submit_sm of the node: throttle, record, route. Returns (status, message_id)."""

        if not isinstance(submit, SubmitSm):
            # data_sm: accepted so the node is not stuck, but not a screen nor an SMS here.
            return 0, f"{next(self._message_ids):x}"
        if self._throttle_share and self._rng.random() < self._throttle_share:
            self.stats["throttled"] += 1
            return int(Status.ESME_RTHROTTLED), ""
        try:
            op = submit.ussd_service_op
            its = submit.its_session_info
            umr = submit.user_message_reference
        except ValueError:
            return int(Status.ESME_RINVOPTPARAMVAL), ""
        is_ussd = op is not None or submit.service_type == self.ussd_service_type
        body = submit.short_message or (submit.message_payload or b"")
        info, user_data = parse_concat(submit.esm_class, body, submit.tlvs)
        text = decode_text(submit.data_coding, user_data)
        message_id = f"{next(self._message_ids):x}"
        msisdn = submit.destination_addr
        dialog_id: int | None
        if self.dialog_id_mode is DialogIdMode.ITS_SESSION_INFO:
            dialog_id = its.session_number if its is not None else umr
        else:
            dialog_id = umr if umr is not None else (its.session_number if its else None)
        end = op == USSD_OP_PSSR_RESPONSE or (
            isinstance(its, ItsSessionInfo) and its.end_of_session
        )
        record = MtRecord(
            msisdn=msisdn,
            source_addr=submit.source_addr,
            text=text,
            is_ussd=is_ussd,
            ussd_service_op=op,
            dialog_id=dialog_id,
            end=end if is_ussd else False,
            data_coding=submit.data_coding,
            registered_delivery=submit.registered_delivery,
            message_id=message_id,
            system_id=system_id,
            time_s=SYSTEM_CLOCK.time(),
            parts=info.total if info is not None else 1,
        )
        if is_ussd:
            self.stats["mt_ussd"] += 1
            self._mt.append(record)
            self._route_screen(record, its.sequence_number if its is not None else None)
        else:
            self.stats["mt_sms"] += 1
            whole = self._reassemble(msisdn, info, text)
            if whole is not None:
                self._mt.append(record if info is None else _replace_text(record, whole))
                handset = self._handsets.get(msisdn)
                if handset is not None:
                    handset.receive_sms(whole)
            if self.delivery_receipts and submit.registered_delivery & 0x01:
                self._spawn(self._send_receipt(record, system_id))
        return 0, message_id

    def _on_submit_late(self, submit: object, system_id: str) -> Any:
        """`_on_submit`, its submit_sm_resp sent `submit_resp_delay_s` late."""
        outcome = self._on_submit(submit, system_id)
        if not self.submit_resp_delay_s:
            return outcome

        async def later() -> tuple[int, str]:
            await asyncio.sleep(self.submit_resp_delay_s)
            return outcome

        return later()

    def _reassemble(self, msisdn: str, info: object, text: str) -> str | None:
        if not isinstance(info, ConcatInfo):
            return text
        return self._reassembler.feed(msisdn, info, text, time.monotonic())

    def _route_screen(self, record: MtRecord, sequence: int | None = None) -> None:
        key = (record.msisdn, record.dialog_id if record.dialog_id is not None else -1)
        waiter = self._waiting.get(key)
        if waiter is None or waiter.future.done():
            self.stats["orphan_screens"] += 1
            if waiter is None and key in self._ended_dialogs:
                self.stats["screens_after_final"] += 1
            return
        if sequence is not None:
            wanted = waiter.sequence_number + (self.its_sequence != "echo")
            if sequence != min(wanted, 0x7F):
                self.stats["its_sequence_mismatch"] += 1
        final = record.end or record.ussd_service_op == USSD_OP_PSSR_RESPONSE
        waiter.future.set_result(Screen(record.text, final))

    async def _send_receipt(self, record: MtRecord, system_id: str) -> None:
        await asyncio.sleep(RECEIPT_DELAY_MS / 1000)
        stamp = time.strftime("%y%m%d%H%M", time.gmtime(record.time_s))
        text = (
            f"id:{record.message_id} sub:001 dlvrd:001 submit date:{stamp} done date:{stamp}"
            f" stat:DELIVRD err:000 text:{record.text[:20]}"
        )
        pdu = DeliverSm(
            source_addr=record.msisdn,
            destination_addr=record.source_addr,
            esm_class=0x04,
            short_message=text.encode("latin-1", errors="replace"),
            tlvs=(
                (int(Tag.RECEIPTED_MESSAGE_ID), record.message_id.encode() + b"\0"),
                (int(Tag.MESSAGE_STATE), bytes((2,))),  # DELIVERED
            ),
        )
        with contextlib.suppress(HandsetError, OSError, TimeoutError):
            if await self._deliver(pdu, system_id=system_id) == 0:
                self.stats["receipts"] += 1

    async def _control_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._control_clients >= CONTROL_CLIENTS_MAX:
            writer.close()
            return
        self._control_clients += 1
        try:
            await _control_session(self, reader, writer)
        finally:
            self._control_clients -= 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _expire(future: asyncio.Future[Screen]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _replace_text(record: MtRecord, text: str) -> MtRecord:
    from dataclasses import replace

    return replace(record, text=text)


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return await value
    return value


def _bound_receivers(server: Any) -> list[str]:
    return list(server.bound_system_ids())


async def _drop_binds(server: Any) -> int:
    """Close every ESME connection of the server at once.

    The shared `Smsc` has no public way to drop binds, so this reaches for its
    connection set; `drop_binds()` on the server is used instead once it exists.
    """
    if hasattr(server, "drop_binds"):
        return int(await _maybe_await(server.drop_binds()))
    live: set[Any] = getattr(server, "_conns", set())
    connections = list(live)
    for connection in connections:
        connection.close()
    # Closing is asynchronous: wait (bounded) until the server has forgotten them, so
    # that is_bound()/wait_bound() after this call see only the binds made again.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DROP_WAIT_S):
            while any(c in live for c in connections):
                await asyncio.sleep(0.01)
    return len(connections)


# --- The control channel for `extrabalance phone` --------------------------------------


async def _control_session(
    smsc: SmscSimulator, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    handset: Handset | None = None
    pusher: asyncio.Task[None] | None = None

    async def send(message: dict[str, Any]) -> None:
        writer.write(json.dumps(message, ensure_ascii=False).encode() + b"\n")
        await writer.drain()

    async def push_sms(h: Handset) -> None:
        while True:
            try:
                text = await h.next_sms(3600.0)
            except TimeoutError:
                continue
            await send({"sms": text})

    try:
        while line := await reader.readline():
            try:
                request = json.loads(line)
                op = request["op"]
                text = str(request.get("text", ""))
            except (ValueError, KeyError, TypeError):
                await send({"ok": False, "error": "expected a JSON object with 'op'"})
                continue
            try:
                if op == "attach":
                    msisdn = str(request.get("msisdn", ""))
                    if handset is not None:
                        raise HandsetError("already attached")
                    handset = Handset(smsc, msisdn)
                    pusher = asyncio.create_task(push_sms(handset))
                    await send({"ok": True})
                    continue
                if handset is None:
                    raise HandsetError("attach first")
                if op == "dial":
                    screen = await handset.dial(text)
                elif op == "reply":
                    screen = await handset.reply(text)
                elif op == "sms":
                    await send({"ok": True, "status": await handset.send_sms(text)})
                    continue
                elif op == "abort":
                    await handset.abort()
                    await send({"ok": True})
                    continue
                else:
                    raise HandsetError(f"unknown op {op!r}")
                await send({"ok": True, "screen": screen.text, "final": screen.final})
            except ScreenTimeout as exc:
                await send({"ok": False, "timeout": True, "error": str(exc)})
            except (HandsetError, ValueError) as exc:
                await send({"ok": False, "error": str(exc)})
    except (OSError, asyncio.LimitOverrunError, ValueError):
        pass  # this phone's connection only
    finally:
        if pusher is not None:
            pusher.cancel()
        if handset is not None:
            with contextlib.suppress(Exception):
                await handset.abort()
            handset.close()
        writer.close()


# --- `extrabalance sim smsc` -------------------------------------------------------------


def build_smsc_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="extrabalance sim smsc",
        description="SMSC / USSD gateway simulator: the SMPP server the node binds to.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2775, help="SMPP port (default 2775)")
    parser.add_argument("--control-port", type=int, default=CONTROL_PORT_DEFAULT,
                        help="control channel for `extrabalance phone` (0: any, -1: off)")
    parser.add_argument("--system-id", default="extrabalance", help="bind system_id accepted")
    parser.add_argument("--also-system-id", action="append", default=[], metavar="SYSTEM_ID",
                        help="another system_id accepted with the same password (repeatable):"
                             " several nodes, each binding as its own ESME")
    parser.add_argument("--password", default=None,
                        help="bind password (default: $EB_SMPP_PASSWORD, else 'secret')")
    parser.add_argument("--short-code", default="1234")
    parser.add_argument("--service-type", default="USSD", help="service_type of USSD traffic")
    parser.add_argument("--dialog-id", choices=[m.value for m in DialogIdMode],
                        default=DialogIdMode.ITS_SESSION_INFO.value)
    parser.add_argument("--abort-op", type=lambda v: int(v, 0), default=USSD_ABORT_OP_DEFAULT)
    parser.add_argument("--receipts", action="store_true", help="send delivery receipts")
    parser.add_argument("--throttle", type=float, default=0.0,
                        help="share of submit_sm answered ESME_RTHROTTLED (0..1)")
    parser.add_argument("--repeat", type=float, default=0.0,
                        help="share of USSD input and MO SMS sent twice, new sequence number")
    parser.add_argument("--submit-resp-delay", type=float, default=0.0,
                        help="seconds before each submit_sm_resp (a slow gateway)")
    parser.add_argument("--enquire-link", type=float, default=30.0,
                        help="enquire_link every N seconds whatever the traffic")
    parser.add_argument("--its-sequence", choices=["increment", "echo"], default="increment",
                        help="its_session_info sequence expected in the node's screens")
    parser.add_argument("--seed", type=int, default=None)
    # Virtual subscribers (traffic) from this process.
    parser.add_argument("--traffic-rate", type=float, default=0.0,
                        help="USSD/SMS operations per second from virtual subscribers (0: none)")
    parser.add_argument("--traffic-mix", default="ussd_menu=4,ussd_shortcut=2,sms_loan=1.5",
                        help="KIND=WEIGHT,... over ussd_menu, ussd_shortcut, sms_loan")
    parser.add_argument("--msisdns", default="201000000001-201000001000",
                        help="range of virtual subscribers, START-END")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of traffic (default: until stopped)")
    parser.add_argument("--ussd-code", default="*123#")
    return parser


async def _run_smsc(args: argparse.Namespace) -> int:
    import os

    from simulators.traffic import TrafficConfig, TrafficGenerator, TrafficMix, expand_msisdns

    password = args.password or os.environ.get("EB_SMPP_PASSWORD") or "secret"
    smsc = SmscSimulator(
        host=args.host,
        port=args.port,
        system_id=args.system_id,
        password=password,
        short_code=args.short_code,
        ussd_service_type=args.service_type,
        dialog_id_mode=args.dialog_id,
        ussd_abort_op=args.abort_op,
        delivery_receipts=args.receipts,
        throttle_share=args.throttle,
        control_port=None if args.control_port < 0 else args.control_port,
        seed=args.seed,
        repeat_share=args.repeat,
        submit_resp_delay_s=args.submit_resp_delay,
        enquire_link_s=args.enquire_link,
        its_sequence=args.its_sequence,
        more_binds=dict.fromkeys(args.also_system_id, password),
    )
    await smsc.start()
    control = f", control channel on {args.host}:{smsc.control_port}" if smsc.control_port else ""
    print(f"SMSC simulator: SMPP on {args.host}:{smsc.port} for {args.system_id!r}{control}",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    traffic_task: asyncio.Task[Any] | None = None
    if args.traffic_rate > 0:
        config = TrafficConfig(
            msisdns=expand_msisdns(args.msisdns),
            mix=TrafficMix.parse(args.traffic_mix),
            rate_per_s=args.traffic_rate,
            duration_s=args.duration if args.duration is not None else 10**9,
            concurrency_max=args.concurrency,
            ussd_code=args.ussd_code,
        )
        generator = TrafficGenerator(config, smsc=smsc)

        async def traffic() -> None:
            print("waiting for the node to bind...", flush=True)
            while not smsc.is_bound() and not stop.is_set():
                await asyncio.sleep(0.2)
            report = await generator.run(stop=stop)
            print(json.dumps(report.as_dict(), indent=2), flush=True)

        traffic_task = asyncio.create_task(traffic())
    try:
        await stop.wait()
    finally:
        if traffic_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(traffic_task, 5.0)
        print(json.dumps({"smsc": smsc.stats}), flush=True)
        await smsc.close()
    return 0


def main_smsc(argv: list[str]) -> int:
    """`extrabalance sim smsc [...]`: run until Ctrl-C / SIGTERM."""
    args = build_smsc_parser().parse_args(argv)
    if not 0.0 <= args.throttle <= 1.0:
        build_smsc_parser().error("--throttle must be within 0..1")
    try:
        return asyncio.run(_run_smsc(args))
    except (ValueError, OSError) as exc:  # bad flag value, port in use
        print(f"extrabalance sim smsc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
