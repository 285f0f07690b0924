"""A tiny in-process USSD/SMS application standing in for the node, for SMSC tests.

`MenuApp.handle(deliver_sm) -> list[SubmitSm]` answers a two-level menu:
`*123#` → menu (op 2), `1` → confirm (op 2), `1` → final (op 17, end bit); `*123*N#`
→ confirm directly; an SMS `LOAN` → an SMS reply. It echoes the dialog id the way
docs/protocols.md says the node does. The same logic serves the loopback tests (behind a
real SMPP client) and the in-process ones (behind `InProcessServer`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from extrabalance.smpp.pdu import DeliverSm, ItsSessionInfo, SubmitSm, Tag, UssdOp
from extrabalance.smpp.text import choose_coding, decode_text
from extrabalance.smpp.ussd import ussd_submit

MENU = "Extra Balance\n1 1.00 EGP\n2 2.00 EGP"
CONFIRM = "Borrow {n}.00 EGP?\n1 Confirm\n2 Cancel"
DONE = "Done: {n}.00 EGP added."


class MenuApp:
    def __init__(self, *, ussd_op_key: str = "its_session_info") -> None:
        self.ussd_op_key = ussd_op_key
        self.state: dict[tuple[str, bytes], str] = {}
        self.received: list[DeliverSm] = []

    def handle(self, pdu: DeliverSm) -> list[SubmitSm]:
        self.received.append(pdu)
        text = decode_text(pdu.data_coding, pdu.short_message)
        msisdn = pdu.source_addr
        op = pdu.ussd_service_op
        if op is None:
            if text.upper().startswith("LOAN"):
                return [self._sms(msisdn, "Extra Balance: 5.00 EGP added.")]
            return [self._sms(msisdn, "Send LOAN")]
        dialog_tlv = pdu.tlv(Tag.ITS_SESSION_INFO)
        tag = Tag.ITS_SESSION_INFO
        if dialog_tlv is None:
            dialog_tlv = pdu.tlv(Tag.USER_MESSAGE_REFERENCE) or b"\0\0"
            tag = Tag.USER_MESSAGE_REFERENCE
        key = (msisdn, dialog_tlv if tag != Tag.ITS_SESSION_INFO else dialog_tlv[:1])
        if op == 1:
            if text == "*123#":
                self.state[key] = "menu"
                return [self._screen(msisdn, MENU, tag, dialog_tlv, final=False)]
            n = text.strip("*#").split("*")[-1]
            self.state[key] = f"confirm:{n}"
            return [self._screen(msisdn, CONFIRM.format(n=n), tag, dialog_tlv, final=False)]
        step = self.state.get(key)
        if op == 18 and step == "menu":
            self.state[key] = f"confirm:{text}"
            return [self._screen(msisdn, CONFIRM.format(n=text), tag, dialog_tlv, final=False)]
        if op == 18 and step and step.startswith("confirm:"):
            del self.state[key]
            n = step.split(":")[1]
            if text == "1":
                return [
                    self._screen(msisdn, DONE.format(n=n), tag, dialog_tlv, final=True),
                    self._sms(msisdn, f"Extra Balance: {n}.00 EGP added."),
                ]
            return [self._screen(msisdn, "Cancelled.", tag, dialog_tlv, final=True)]
        self.state.pop(key, None)
        return []  # abort or unknown: nothing to say

    def _screen(self, msisdn: str, text: str, tag: int, dialog: bytes, *, final: bool) -> SubmitSm:
        op = UssdOp.PSSR_RESPONSE if final else UssdOp.USSR_REQUEST
        if tag == Tag.ITS_SESSION_INFO:
            its = ItsSessionInfo.from_bytes(dialog)
            session = ItsSessionInfo(its.session_number, its.sequence_number, final)
            return ussd_submit(msisdn, "123", text, op=op, session=session)
        return ussd_submit(msisdn, "123", text, op=op,
                           user_message_reference=int.from_bytes(dialog, "big"))

    def _sms(self, msisdn: str, text: str) -> SubmitSm:
        coding, octets = choose_coding(text)
        return SubmitSm(
            source_addr="1234", destination_addr=msisdn, data_coding=coding,
            short_message=octets, registered_delivery=1,
        )


class InProcessServer:
    """Stands in for the SMPP server inside SmscSimulator: deliver_sm goes straight to
    the app, whose submit_sm come back through the simulator's submit handler."""

    def __init__(self, smsc: Any, app: MenuApp, *, silent: bool = False) -> None:
        self.smsc = smsc
        self.app = app
        self.silent = silent
        self.statuses: list[int] = []
        self.receipts: list[DeliverSm] = []
        self.delivered: list[DeliverSm] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def deliver(self, pdu: DeliverSm, system_id: str | None = None, *,
                      connection: Any = None) -> int:
        self.delivered.append(pdu)
        if pdu.esm_class & 0x04:
            self.receipts.append(pdu)
            return 0
        if not self.silent:
            task = asyncio.create_task(self._answer(pdu))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return 0

    async def _answer(self, pdu: DeliverSm) -> None:
        await asyncio.sleep(0)
        for submit in self.app.handle(pdu):
            status, _mid = self.smsc._on_submit(submit, "extrabalance")
            self.statuses.append(status)

    def bound_system_ids(self) -> list[str]:
        return ["extrabalance"]

    def receivers(self, system_id: str | None = None) -> list[Any]:
        return [self]  # one bind, always up

    async def drop_binds(self) -> int:
        return 1

    def close(self) -> None:
        pass
