"""Every SMS the node sends, through the ESME: the service layer's `Notifier`.

The outbox hands it the notices written with the money (and the advertiser its ads);
the inbound SMPP channel hands it its keyword replies, already rendered. It depends
only on the ESME's `send_sms`, so it exists before the services that notify through
it, and the inbound channel (which needs those services) is built after them.

It remembers the message ids the SMSC gave recent SMS so that a delivery receipt
coming back on a bind can be matched to what was sent (`receipted`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from extrabalance.service.ports import Notice
from extrabalance.service.templates import Templates

log = structlog.get_logger(__name__)

SENT_TRACKED_MAX = 100_000  # message ids kept to match delivery receipts


def outbox_reference(outbox_id: str) -> int:
    """The 16 bits of an outbox id sent as user_message_reference: its last four hex
    digits (random bits of the id), the same on every attempt of one message."""
    return int(outbox_id[-4:], 16)


class SmsNotifier:
    def __init__(
        self,
        send_sms: Callable[..., Awaitable[Any]],
        *,
        templates: Templates,
        short_code: str,
        delivery_receipts: bool = True,
        outbox_reference_tlv: bool = False,
    ) -> None:
        self._send_sms = send_sms
        self._t = templates
        self._short_code = short_code
        self._delivery_receipts = delivery_receipts
        self._outbox_reference_tlv = outbox_reference_tlv
        self._sent: OrderedDict[str, tuple[str, str]] = OrderedDict()  # message id → (msisdn, template)
        self.stats = {"sms_out": 0, "sms_failed": 0}

    @property
    def sent_tracked(self) -> int:
        """Message ids held for delivery receipts (bounded by SENT_TRACKED_MAX)."""
        return len(self._sent)

    def set_templates(self, templates: Templates) -> None:
        """Config reload: texts change for the next notice."""
        self._t = templates

    def receipted(self, message_id: str) -> bool:
        """A delivery receipt for `message_id` came back: True if it is one we sent."""
        return self._sent.pop(message_id, None) is not None

    async def notify(self, notice: Notice) -> None:
        """Render and submit. A notice from the outbox (`outbox_id` set) raises when
        the SMSC did not take it, so the outbox sender retries it; the log line names
        the outbox id on every attempt (and, opt-in, so does user_message_reference)."""
        text = self._t.render(notice.template, notice.language, notice.params)
        await self.send(notice.msisdn, text, template=notice.template,
                        outbox_id=notice.outbox_id)

    async def send(self, msisdn: str, text: str, *, template: str,
                   outbox_id: str | None = None) -> None:
        """Submit `text` from the short code; a failure is logged and counted, and
        raised only for an outbox notice (the outbox retries it)."""
        extra: dict[str, Any] = {}
        if outbox_id is not None and self._outbox_reference_tlv:
            extra["user_message_reference"] = outbox_reference(outbox_id)
        try:
            results = await self._send_sms(self._short_code, msisdn, text,
                                           registered_delivery=self._delivery_receipts, **extra)
        except Exception as exc:
            self.stats["sms_failed"] += 1
            log.warning("sms_submit_failed", msisdn=msisdn, template=template, error=str(exc),
                        outbox_id=outbox_id)
            if outbox_id is not None:
                raise
            return
        if outbox_id is not None:
            log.info("sms_submitted", template=template, outbox_id=outbox_id)
        self.stats["sms_out"] += 1
        for result in results or ():
            message_id = getattr(result, "message_id", None)
            if message_id:
                self._sent[message_id] = (msisdn, template)
                while len(self._sent) > SENT_TRACKED_MAX:
                    self._sent.popitem(last=False)
