"""Subscribers over SMPP: USSD dialogs and SMS keywords (what they send; every SMS of
the node, replies included, goes out through `sms_notifier.SmsNotifier`).

Inbound deliver_sm are answered at once (deliver_sm_resp) and handled in a bounded
set of tasks, so a slow IN never holds the gateway's window; past the bound the node
answers ESME_RTHROTTLED and the gateway re-sends later, instead of queueing without
limit. Replies are rendered from templates in the subscriber's language.

Idempotency of SMS loans: an MO deliver_sm has no message id of its own (SMPP 3.4
§4.6.1 gives the ESME none to key on), and an SMSC that missed our deliver_sm_resp
re-sends the MO under a new sequence number, possibly on another bind. So a loan
request is keyed by the MSISDN and the request itself (the keyword and the amount,
normalised): the same request again within `sms_repeat_window_s` (default 120 s,
longer than SMSC re-send intervals after a lost response, short enough that a
subscriber asking again minutes later is a new request) reuses the first one's
idempotency key, so the lending service replays the first outcome: one loan, and no
second confirmation SMS. Outside the window, the user_message_reference (when sent)
or the PDU's sequence number keys the request as before.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from extrabalance.adapters.sms_notifier import SmsNotifier
from extrabalance.core.msisdn import is_msisdn
from extrabalance.core.policy import Policy
from extrabalance.service.keywords import Command, parse_keyword
from extrabalance.service.templates import Templates, format_minor
from extrabalance.service.ussd import Screen, UssdDialogs, UssdInput
from extrabalance.smpp.pdu import DeliverSm, ItsSessionInfo, Status, TlvValueError, UssdOp
from extrabalance.smpp.text import Reassembler, decode_text, parse_concat, parse_receipt
from extrabalance.smpp.ussd import parse_ussd_deliver, ussd_submit

log = structlog.get_logger(__name__)

INBOUND_TASKS_MAX = 2000  # deliver_sm being handled at once; beyond: ESME_RTHROTTLED
CONCAT_PENDING_MAX = 10_000  # incoming long SMS waiting for their other parts
CONCAT_TIMEOUT_S = 120.0  # a part whose siblings do not come in this time is dropped
SMS_REPEAT_WINDOW_S = 120.0  # the same SMS loan request again within it: the SMSC's re-send
SMS_RECENT_MAX = 100_000  # loan requests remembered for that window
SCREENS_TRACKED_MAX = 100_000  # open dialogs whose latest screen is known



class SmppChannel:
    def __init__(
        self,
        *,
        dialogs: UssdDialogs,
        lending: Any,
        templates: Templates,
        policy: Policy,
        submit: Callable[..., Awaitable[Any]],
        sms: SmsNotifier,
        ussd_code: str = "*123#",
        ussd_service_type: str = "USSD",
        dialog_id: str = "its_session_info",
        abort_op: int = 0x81,
        observe_ussd: Callable[[float], None] | None = None,
        inbound_tasks_max: int = INBOUND_TASKS_MAX,
        sms_repeat_window_s: float = SMS_REPEAT_WINDOW_S,
        its_sequence: Callable[[str], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if inbound_tasks_max < 1:
            raise ValueError("inbound_tasks_max must be at least 1")
        self.inbound_tasks_max = inbound_tasks_max
        self._dialogs = dialogs
        self._lending = lending
        self._t = templates
        self._policy = policy
        self._submit = submit
        self._sms_out = sms  # replies go out as every other SMS of the node
        self._ussd_source = ussd_code
        self._service_type = ussd_service_type
        self._dialog_id = dialog_id
        self._abort_op = abort_op
        self._observe_ussd = observe_ussd
        self._tasks: set[asyncio.Task[None]] = set()
        self._reassembler = Reassembler(entries_max=CONCAT_PENDING_MAX, timeout_s=CONCAT_TIMEOUT_S)
        self._clock = clock
        # bind name → "increment" or "echo": the its_session_info sequence we answer with
        self._its_sequence = its_sequence or (lambda bind: "increment")
        # (msisdn, dialog key) → number of the dialog's latest screen
        self._screens: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._sms_repeat_window_s = sms_repeat_window_s
        # (msisdn, request) → (first seen, idempotency key) of recent SMS loan requests
        self._recent_loans: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self.accepting = True
        self.stats = {"ussd_in": 0, "sms_in": 0, "receipts": 0, "receipts_matched": 0,
                      "throttled": 0, "rejected": 0, "ussd_out": 0,
                      "ussd_failed": 0, "ussd_repeats": 0, "sms_repeats": 0}

    @property
    def inflight(self) -> int:
        """deliver_sm being handled right now (bounded by inbound_tasks_max)."""
        return len(self._tasks)

    def set_policy(self, policy: Policy, templates: Templates) -> None:
        """Config reload: tiers (for `LOAN 10`) and texts change for the next message."""
        self._policy, self._t = policy, templates

    # -- inbound ---------------------------------------------------------------

    def on_deliver(self, pdu: Any, system_id: str) -> int:
        """deliver_sm handler for the ESME: returns the deliver_sm_resp status at once
        (a plain function: the ESME then answers without creating a task)."""
        if not isinstance(pdu, DeliverSm):
            return int(Status.ESME_RINVCMDID)
        # The TLVs the handlers read, checked once here: a malformed one gets its own
        # status in the deliver_sm_resp instead of an exception in a handler later.
        try:
            ussd_op = pdu.ussd_service_op
            pdu.its_session_info  # noqa: B018 - read for validation
            pdu.user_message_reference  # noqa: B018
            pdu.message_payload  # noqa: B018
            pdu.receipted_message_id  # noqa: B018
        except TlvValueError as exc:
            self.stats["rejected"] += 1
            return int(exc.status)
        if pdu.is_delivery_receipt:
            self._receipt(pdu)
            return 0
        if not is_msisdn(pdu.source_addr):
            # Not a subscriber number (E.164, at most 15 digits): nobody to lend to.
            self.stats["rejected"] += 1
            return int(Status.ESME_RINVSRCADR)
        if ussd_op is None and pdu.service_type == self._service_type:
            # A USSD dialog message needs its operation; without it there is nothing
            # to answer on the handset.
            self.stats["rejected"] += 1
            return int(Status.ESME_RMISSINGOPTPARAM)
        if not self.accepting or len(self._tasks) >= self.inbound_tasks_max:
            self.stats["throttled"] += 1
            return int(Status.ESME_RTHROTTLED)
        if ussd_op is not None:
            self.stats["ussd_in"] += 1
            self._spawn(self._ussd(pdu, system_id))
        else:
            self.stats["sms_in"] += 1
            self._spawn(self._sms(pdu, system_id))
        return 0

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float) -> None:
        """Stop taking new input and wait for what is in flight (graceful stop)."""
        self.accepting = False
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def _receipt(self, pdu: DeliverSm) -> None:
        self.stats["receipts"] += 1
        message_id = pdu.receipted_message_id
        if message_id is None:
            receipt = parse_receipt(decode_text(pdu.data_coding, pdu.short_message))
            message_id = receipt.message_id if receipt is not None else None
        if message_id is not None and self._sms_out.receipted(message_id):
            self.stats["receipts_matched"] += 1

    async def _ussd(self, pdu: DeliverSm, bind: str = "") -> None:
        started = time.perf_counter()
        try:
            ind = parse_ussd_deliver(pdu, abort_op=self._abort_op)
        except Exception as exc:  # noqa: BLE001 - a malformed USSD PDU: logged, nothing else to do
            log.warning("ussd_unreadable", error=str(exc))
            return
        if ind is None:  # on_deliver sends only PDUs with ussd_service_op here
            return
        if self._dialog_id == "user_message_reference":
            key = str(ind.user_message_reference)
        else:
            key = str(ind.session.session_number) if ind.session is not None else "-"
        if ind.is_abort:
            self._dialogs.abort(ind.msisdn, key)
            return
        step = ind.session.sequence_number if ind.session is not None else None
        try:
            screen = await self._dialogs.handle(
                UssdInput(ind.msisdn, key, ind.text, new_dialog=ind.op == UssdOp.PSSR_INDICATION,
                          step=step)
            )
        except Exception:
            log.exception("ussd_dialog_failed", msisdn=ind.msisdn)
            screen = Screen(self._t.render("refused_screen", None, {"reason": "IN_UNAVAILABLE"}),
                            final=True)
        if screen is None:
            # The gateway repeated an input: its screen went out (or is on its way).
            self.stats["ussd_repeats"] += 1
            return
        text, final = screen.text, screen.final
        session = None
        if ind.session is not None:
            sequence = ind.session.sequence_number
            if self._its_sequence(bind) != "echo":
                sequence = min(sequence + 1, 0x7F)
            session = ItsSessionInfo(ind.session.session_number, sequence, end_of_session=final)
        submit = ussd_submit(
            ind.msisdn, ind.dest_addr or self._ussd_source, text,
            op=UssdOp.PSSR_RESPONSE if final else UssdOp.USSR_REQUEST,
            session=session,
            user_message_reference=ind.user_message_reference,
            service_type=self._service_type,
        )
        # A screen is re-sent (throttled, bind lost) only while it is the dialog's
        # latest: never after a later screen or the final one went out.
        dialog = (ind.msisdn, key)
        generation = self._screens.get(dialog, 0) + 1
        self._screens[dialog] = generation
        self._screens.move_to_end(dialog)
        while len(self._screens) > SCREENS_TRACKED_MAX:
            self._screens.popitem(last=False)
        try:
            await self._submit(submit, resend_if=lambda: self._screens.get(dialog) == generation)
            self.stats["ussd_out"] += 1
        except Exception as exc:  # noqa: BLE001 - one subscriber's message never stops the channel
            self.stats["ussd_failed"] += 1
            log.warning("ussd_submit_failed", msisdn=ind.msisdn, error=str(exc))
        if final and self._screens.get(dialog) == generation:
            del self._screens[dialog]  # what is still being re-sent of it stops
        if self._observe_ussd is not None:
            self._observe_ussd(time.perf_counter() - started)

    def _mo_text(self, pdu: DeliverSm) -> str | None:
        """The SMS text, or None while parts of a concatenated SMS are still missing
        (UDH with 8- or 16-bit reference, or the SAR TLVs; bounded, timed out)."""
        try:
            if pdu.message_payload:
                return decode_text(pdu.data_coding, pdu.message_payload)
            info, body = parse_concat(pdu.esm_class, pdu.short_message, pdu.tlvs)
            text = decode_text(pdu.data_coding, body)
        except Exception:  # noqa: BLE001 - one subscriber's message never stops the channel
            return ""
        if info is None:
            return text
        now = self._clock()
        self._reassembler.expire(now)
        return self._reassembler.feed(pdu.source_addr, info, text, now)

    async def _sms(self, pdu: DeliverSm, system_id: str) -> None:
        msisdn = pdu.source_addr
        text = self._mo_text(pdu)
        if text is None:
            return  # a part of a longer SMS: the reply comes when the last part arrives
        kw = parse_keyword(text)
        lang = kw.language
        # The MSISDN is masked by the logging setup unless the operator turned it off.
        log.info("sms_received", msisdn=msisdn, command=kw.command.value, bind=system_id)
        reply: str | None = None
        try:
            if kw.command is Command.LOAN:
                tier_id = None
                if kw.amount_text is not None:
                    reply = self._amounts_reply(lang)
                elif kw.amount_major is not None:
                    wanted = kw.amount_major * 10 ** self._policy.currency.exponent
                    tier_id = next((t.tier_id for t in self._policy.tiers.values()
                                    if t.amount_minor == wanted and t.bundle is None), None)
                    if tier_id is None:
                        reply = self._amounts_reply(lang)
                if reply is None:
                    key = self._sms_loan_key(pdu, system_id, f"{kw.amount_major}")
                    # The lending service confirms every outcome by SMS itself (a
                    # replayed outcome is not confirmed again), or, under a consumer-
                    # protection preset, asks for the reply YES first.
                    await self._lending.sms_loan(msisdn, tier_id, key)
            elif kw.command is Command.DATA:
                if not any(t.kind == "data" for t in self._policy.tiers.values()):
                    reply = self._t.render("no_bundle", lang) if self._t.has(
                        "no_bundle", lang) else self._t.render("unknown_keyword", lang)
                else:
                    key = self._sms_loan_key(pdu, system_id, "data")
                    # Outcome by SMS from the lending service, as for LOAN.
                    await self._lending.sms_loan(msisdn, None, key, kind="data")
            elif kw.command is Command.CONFIRM:
                _key, repeat = self._sms_request(pdu, system_id, "yes")
                if not repeat:  # the SMSC's re-send of a YES just taken gets nothing
                    template = await self._lending.confirm_by_reply(msisdn)
                    if template is not None:
                        reply = self._t.render(template, lang)
            elif kw.command is Command.BALANCE:
                offer = await self._lending.quote(msisdn)
                reply = self._t.render("balance_reply", lang, {
                    "debt": offer.debt_minor, "headroom": offer.headroom_minor})
            elif kw.command is Command.HELP:
                reply = self._t.render("help_reply", lang)
            elif kw.command is Command.STOP_ADS:
                await self._lending.set_preferences(msisdn, ads_opt_out=True)
                reply = self._t.render("ads_stopped", lang)
            elif kw.command is Command.START_ADS:
                await self._lending.set_preferences(msisdn, ads_opt_out=False)
                reply = self._t.render("ads_started", lang)
            else:
                reply = self._t.render("unknown_keyword", lang)
        except Exception:
            log.exception("sms_keyword_failed", msisdn=msisdn)
            reply = self._t.render("loan_refused", lang, {"reason": "IN_UNAVAILABLE"})
        if reply is not None:
            await self._sms_out.send(msisdn, reply, template=kw.command.value)

    def _sms_loan_key(self, pdu: DeliverSm, system_id: str, request: str) -> str:
        """The idempotency key of an SMS loan request: the first one's within the
        repeat window (see the module docstring)."""
        return self._sms_request(pdu, system_id, request)[0]

    def _sms_request(self, pdu: DeliverSm, system_id: str, request: str) -> tuple[str, bool]:
        """The request's key, and whether it repeats one taken within the window."""
        now = self._clock()
        recent = self._recent_loans
        while recent and now - next(iter(recent.values()))[0] > self._sms_repeat_window_s:
            recent.popitem(last=False)
        seen = recent.get((pdu.source_addr, request))
        if seen is not None:
            self.stats["sms_repeats"] += 1
            return seen[1], True
        reference = pdu.user_message_reference
        ref = f"umr{reference}" if reference is not None else f"seq{pdu.sequence_number}"
        key = f"sms:{system_id}:{pdu.source_addr}:{ref}"
        if self._sms_repeat_window_s > 0:
            recent[(pdu.source_addr, request)] = (now, key)
            while len(recent) > SMS_RECENT_MAX:
                recent.popitem(last=False)
        return key, False

    def _amounts_reply(self, lang: str) -> str:
        exponent = self._policy.currency.exponent
        amounts = ", ".join(
            format_minor(t.amount_minor, exponent).removesuffix("." + "0" * exponent)
            for t in sorted(self._policy.tiers.values(), key=lambda t: t.amount_minor)
            if t.bundle is None)
        return self._t.render("no_such_amount", lang, {"amounts": amounts})
