r"""USSD dialogs: the `*123#` menus a subscriber walks through on the handset.

This module owns the dialog state (which screen each open dialog shows) and turns a
subscriber's input into the next screen. It knows nothing of SMPP: the channel
adapter hands it a `UssdInput` and sends back the returned `Screen` (a USSR request
that expects a reply, or a final PSSR response that releases the dialog).

Screens a dialog can show:

    MENU(page) --tier n--> CONFIRM(n) --1--> final: granted / pending / refused
       |   \--99--> MENU(page+1)       \--2--> final: cancelled
       \--0--> ACCOUNT --1/2/3--> ACCOUNT (toggled) --9--> MENU(0)

`*123*N#` opens straight on CONFIRM(N). A screen never exceeds 182 GSM 7-bit or 80
UCS2 characters: the tier list is paginated, never cut.

Money safety: the loan is requested with an idempotency key made of the dialog's own
id (unique per dialog, not the gateway's short session number, which wraps) and the
step, so a duplicated deliver_sm replays the first outcome and never lends twice.

Repeated inputs: gateways re-send a subscriber's input (a new SMPP sequence number,
the same its_session_info) when they miss our deliver_sm_resp or time out on their
side. An input is a repeat when it carries the same dialog step (the sequence number
of its_session_info, SMPP 3.4 §5.3.2.43) and the same text as one already taken, or,
when the gateway sends no step, the same text as the previous input within
`repeat_window_s`. A repeat never advances the dialog and gets no screen of its own:
its first copy's screen went out or is on its way, and a second copy could reach the
handset after the subscriber's next input (a menu shown again where the confirm
screen was due). Never a second final screen either: ended and aborted dialogs are
remembered for `timeout_s` for this.
"""

from __future__ import annotations

import functools
import itertools
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from extrabalance.clock import SYSTEM_CLOCK
from extrabalance.core.lending import Channel
from extrabalance.core.protection import fee_percent
from extrabalance.service.keywords import ascii_digits
from extrabalance.service.templates import Templates
from extrabalance.smpp.text import gsm7_length, is_gsm7

SCREEN_GSM7_MAX = 182  # characters of one USSD screen in GSM 7-bit (3GPP TS 23.038 / 24.090)
SCREEN_UCS2_MAX = 80  # characters of one USSD screen in UCS2
MENUS_KEPT_MAX = 1024  # menus kept per (language, offer); past this the cache starts over
OPTION_MORE = "99"
OPTION_ACCOUNT = "0"
OPTION_BACK = "9"
# Without a step number from the gateway, the same text again within this many
# seconds is taken as the gateway's repeat: shorter than a subscriber can read a
# screen and answer it.
REPEAT_WINDOW_S = 2.0


@dataclass(frozen=True, slots=True)
class UssdInput:
    msisdn: str
    dialog_key: str  # gateway dialog id (its_session_info or user_message_reference)
    text: str
    new_dialog: bool  # PSSR indication (op 1) rather than a USSR confirm (op 18)
    step: int | None = None  # the gateway's sequence number of this input (its_session_info)


@dataclass(frozen=True, slots=True)
class Screen:
    text: str
    final: bool  # True: PSSR response with the end bit, the dialog is released


class LendingApi(Protocol):
    """What the dialogs need from the lending service (see service/lending.py)."""

    policy: Any  # replaced (never mutated) by a config reload

    async def quote(self, msisdn: str) -> Any: ...
    async def borrow(
        self, msisdn: str, tier_id: int | None, channel: Channel, idempotency_key: str,
        *, answer_early: bool = False,
    ) -> Any: ...
    async def status(self, msisdn: str) -> Any: ...
    async def overview(self, msisdn: str) -> tuple[Any, Any]: ...  # (status, offer), one read
    # "confirm_by_sms" when turning auto-advance on waits for his reply (double opt-in)
    async def set_preferences(
        self, msisdn: str, *, auto_advance: bool | None = None,
        ads_opt_out: bool | None = None, language: str | None = None,
    ) -> Any: ...
    def record_refusal(self, msisdn: str, reason: str, channel: str) -> None: ...
    async def record_consent(
        self, msisdn: str, action: str, channel: str, detail: dict[str, Any] | None = None
    ) -> None: ...


@dataclass(slots=True)
class _Inputs:
    """The inputs a dialog took, to recognise a gateway's repeat of one of them."""

    taken: set[tuple[int | None, str]] = field(default_factory=set)  # (step, text)
    last_text: str | None = None
    last_at: float = 0.0
    closed_at: float = 0.0


class Step(Enum):
    MENU = "menu"
    CONFIRM = "confirm"
    ACCOUNT = "account"
    BUSY = "busy"  # a loan request of this dialog is in flight


@dataclass(slots=True)
class Dialog:
    dialog_id: str
    msisdn: str
    language: str
    step: Step = Step.MENU
    page: int = 0
    tier_id: int | None = None
    quoted: tuple[int, int, int] | None = None  # (amount, fee, total) the confirm screen showed
    last_screen: Screen | None = None
    touched_at: float = 0.0
    pages: list[list[tuple[str, str]]] = field(default_factory=list)  # (option, line)
    # The offer read when the dialog opened and the policy it was computed under. The
    # menu and the confirm screen are shown from it (one ledger read per dialog); the
    # loan itself is decided again in the ledger, so a debt that grew meanwhile is
    # refused there, and a reload (a new policy object) makes the dialog read again.
    offer: Any = None
    offer_policy: Any = None
    overflow: list[Screen] = field(default_factory=list)  # the rest of a long screen
    inputs: _Inputs = field(default_factory=_Inputs)


class UssdDialogs:
    """Open dialogs, bounded in number and lifetime."""

    def __init__(
        self,
        lending: LendingApi,
        templates: Templates,
        *,
        ussd_code: str = "*123#",
        timeout_s: float = 60.0,
        dialogs_max: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        node_name: str = "eb",
        repeat_window_s: float = REPEAT_WINDOW_S,
    ) -> None:
        self._lending = lending
        self._t = templates
        self._service_code = ussd_code.strip("#").lstrip("*")  # "123"
        self._timeout_s = timeout_s
        self._dialogs_max = dialogs_max
        self._clock = clock
        self._repeat_window_s = repeat_window_s
        self._dialogs: OrderedDict[tuple[str, str], Dialog] = OrderedDict()
        # Inputs of dialogs that ended, kept `timeout_s` to recognise late repeats.
        self._ended: OrderedDict[tuple[str, str], _Inputs] = OrderedDict()
        self._ids = itertools.count(1)
        # Menus built per (language, offer): the offer (tiers, fees, debt, headroom) is
        # all a menu shows, and most subscribers see one of a few; the pages are shared
        # and never changed in place.
        self._menus: dict[tuple[str, Any], tuple[str, list[list[tuple[str, str]]]]] = {}
        self._id_prefix = f"{node_name}-{int(SYSTEM_CLOCK.time() * 1000):x}"
        self.stats = {"opened": 0, "expired": 0, "evicted": 0, "aborted": 0, "completed": 0,
                      "repeats": 0}

    def set_templates(self, templates: Templates) -> None:
        """Config reload: the next screen of every dialog uses the new texts."""
        self._t = templates
        self._menus.clear()

    def __len__(self) -> int:
        return len(self._dialogs)

    # -- lifetime --------------------------------------------------------------

    def expire(self) -> int:
        """Drop dialogs idle longer than the timeout; returns how many."""
        now = self._clock()
        dropped = 0
        while self._dialogs:
            key, dialog = next(iter(self._dialogs.items()))
            if now - dialog.touched_at < self._timeout_s:
                break
            del self._dialogs[key]
            dropped += 1
        self.stats["expired"] += dropped
        ended = self._ended
        while ended and now - next(iter(ended.values())).closed_at >= self._timeout_s:
            ended.popitem(last=False)
        return dropped

    def abort(self, msisdn: str, dialog_key: str) -> None:
        dialog = self._dialogs.pop((msisdn, dialog_key), None)
        if dialog is not None:
            self.stats["aborted"] += 1
            self._remember_ended((msisdn, dialog_key), dialog.inputs)  # late repeats: nothing

    def _touch(self, key: tuple[str, str], dialog: Dialog) -> None:
        dialog.touched_at = self._clock()
        self._dialogs[key] = dialog
        self._dialogs.move_to_end(key)

    def _open(self, key: tuple[str, str], msisdn: str, language: str) -> Dialog:
        self.expire()
        while len(self._dialogs) >= self._dialogs_max:
            self._dialogs.popitem(last=False)
            self.stats["evicted"] += 1
        dialog = Dialog(f"{self._id_prefix}-{next(self._ids)}", msisdn, language)
        self._ended.pop(key, None)
        self._touch(key, dialog)
        self.stats["opened"] += 1
        return dialog

    def _close(self, key: tuple[str, str], screen: Screen) -> Screen:
        dialog = self._dialogs.pop(key, None)
        if dialog is not None:
            self._remember_ended(key, dialog.inputs)
        self.stats["completed"] += 1
        return screen

    def _remember_ended(self, key: tuple[str, str], inputs: _Inputs) -> None:
        inputs.closed_at = self._clock()
        self._ended[key] = inputs
        self._ended.move_to_end(key)
        while len(self._ended) > self._dialogs_max:
            self._ended.popitem(last=False)

    def _is_repeat(self, inputs: _Inputs, inp: UssdInput, text: str, now: float) -> bool:
        if inp.step is not None:
            return (inp.step, text) in inputs.taken
        return inputs.last_text == text and now - inputs.last_at <= self._repeat_window_s

    def _took(self, inputs: _Inputs, inp: UssdInput, text: str, now: float) -> None:
        """Note an input as taken, before its answer is computed."""
        if inp.step is None:
            inputs.taken.clear()  # without steps only the previous input is compared
        inputs.taken.add((inp.step, text))
        inputs.last_text, inputs.last_at = text, now

    # -- input -----------------------------------------------------------------

    async def handle(self, inp: UssdInput) -> Screen | None:
        """The screen answering `inp`, or None when nothing is to be sent (a repeat
        whose screen went out already or is still being computed)."""
        key = (inp.msisdn, inp.dialog_key)
        self.expire()
        now = self._clock()
        dialog = self._dialogs.get(key)
        text = ascii_digits(inp.text.strip())  # "١" is "1", as in SMS keywords
        if dialog is not None and self._is_repeat(dialog.inputs, inp, text, now):
            # Its first copy's screen went out or is on its way: sending it again
            # could reach the handset after the subscriber's next input.
            self.stats["repeats"] += 1
            self._touch(key, dialog)
            return None
        ended = self._ended.get(key) if dialog is None else None
        if ended is not None and self._is_repeat(ended, inp, text, now) and (
            not inp.new_dialog or now - ended.last_at <= self._repeat_window_s
        ):
            # The dialog's final screen went out: never a second one.
            self.stats["repeats"] += 1
            return None
        if inp.new_dialog:
            if dialog is not None and dialog.last_screen is not None:
                # The gateway repeated the opening deliver_sm: show the same screen.
                self._touch(key, dialog)
                return dialog.last_screen
            # Opened before the ledger read, so that a repeat arriving meanwhile is
            # recognised; the language is set once the subscriber is known.
            dialog = self._open(key, inp.msisdn, self._t.language(None))
            self._took(dialog.inputs, inp, text, now)
            status, offer = await self._lending.overview(inp.msisdn)
            dialog.language = self._t.language(_attr(status, "language"))
            self._keep_offer(dialog, offer)
            screen = await self._open_with_code(key, dialog, text)
        elif dialog is None:
            language = self._t.language(None)
            if ended is not None:  # its repeat gets no second "expired" screen
                self._took(ended, inp, text, now)
            return Screen(self._t.render("expired_screen", language), final=True)
        else:
            self._touch(key, dialog)
            self._took(dialog.inputs, inp, text, now)
            if text == OPTION_MORE and dialog.overflow:
                return self._next_overflow(key, dialog)
            dialog.overflow = []
            screen = await self._reply(key, dialog, text)
        if screen_capacity(screen.text) < 0:
            screen = self._paginate_screen(key, dialog, screen)
        if not screen.final and key in self._dialogs:
            dialog.last_screen = screen
        return screen

    def _paginate_screen(self, key: tuple[str, str], dialog: Dialog, screen: Screen) -> Screen:
        """A screen longer than one USSD screen is split, never cut: "99 More" shows the
        rest; the options of the last part answer as usual from any part."""
        more = self._t.render("menu_more", dialog.language)
        parts = split_screen(screen.text, more)
        if screen.final:
            # The dialog stays open for the rest of a final text; the last part ends it.
            self._ended.pop(key, None)
            self._dialogs[key] = dialog
            self._touch(key, dialog)
        dialog.overflow = [Screen(p, False) for p in parts[1:-1]] + [Screen(parts[-1], screen.final)]
        return Screen(parts[0], False)

    def _next_overflow(self, key: tuple[str, str], dialog: Dialog) -> Screen:
        screen = dialog.overflow.pop(0)
        if screen.final:
            return self._close(key, screen)
        dialog.last_screen = screen
        return screen

    async def _open_with_code(self, key: tuple[str, str], dialog: Dialog, code: str) -> Screen:
        parts = _parse_code(code, self._service_code)
        if parts is None:
            return self._close(key, Screen(self._t.render("invalid_choice", dialog.language), True))
        if not parts:
            return await self._menu(key, dialog, page=0)
        if len(parts) == 1 and parts[0] == 0:
            return await self._account(key, dialog)
        return await self._confirm(key, dialog, parts[0])

    async def _reply(self, key: tuple[str, str], dialog: Dialog, text: str) -> Screen:
        lang = dialog.language
        if dialog.step is Step.BUSY:
            return Screen(self._t.render("pending_screen", lang, {"amount": 0}), final=False)
        if dialog.step is Step.MENU:
            if text == OPTION_MORE and dialog.page + 1 < len(dialog.pages):
                return await self._menu(key, dialog, dialog.page + 1)
            if text == OPTION_ACCOUNT:
                return await self._account(key, dialog)
            options = {opt for opt, _ in dialog.pages[dialog.page]} if dialog.pages else set()
            if text.isdigit() and text in options and text not in (OPTION_MORE, OPTION_ACCOUNT):
                return await self._confirm(key, dialog, int(text))
            return self._again(dialog)
        if dialog.step is Step.CONFIRM:
            if text == "1" and dialog.tier_id is not None:
                return await self._lend(key, dialog)
            if text == "2":
                if dialog.quoted is not None:  # declined: on his consent trail
                    amount, fee, total = dialog.quoted
                    await self._lending.record_consent(dialog.msisdn, "loan_declined", "ussd", {
                        "tier_id": dialog.tier_id, "amount_minor": amount, "fee_minor": fee,
                        "fee_percent": fee_percent(fee, amount), "total_minor": total})
                return self._close(key, Screen(self._t.render("cancelled_screen", lang), True))
            return self._again(dialog)
        if dialog.step is Step.ACCOUNT:
            if text == OPTION_BACK:
                return await self._menu(key, dialog, page=0)
            status = await self._lending.status(dialog.msisdn)
            if text == "1":
                waits = await self._lending.set_preferences(
                    dialog.msisdn, auto_advance=not bool(_attr(status, "auto_advance_opt_in"))
                )
                if waits == "confirm_by_sms" and self._t.has("opt_in_sms_sent", lang):
                    return await self._account(key, dialog, note="opt_in_sms_sent")
            elif text == "2":
                await self._lending.set_preferences(
                    dialog.msisdn, ads_opt_out=not bool(_attr(status, "ads_opt_out"))
                )
            elif text == "3":
                others = [lang for lang in self._t.languages() if lang != dialog.language]
                if others:
                    dialog.language = others[0]
                    await self._lending.set_preferences(dialog.msisdn, language=dialog.language)
            else:
                return self._again(dialog)
            return await self._account(key, dialog, saved=True)
        return self._again(dialog)

    def _again(self, dialog: Dialog) -> Screen:
        previous = dialog.last_screen.text if dialog.last_screen else ""
        hint = self._t.render("invalid_choice", dialog.language)
        if not previous:
            return Screen(hint, final=False)
        # Prefer the hint above the whole screen; on a full screen it replaces the title.
        for text in (f"{hint}\n{previous}", f"{hint}\n{previous.split(chr(10), 1)[-1]}"):
            if screen_capacity(text) >= 0:
                return Screen(text, final=False)
        return Screen(previous, final=False)

    # -- screens ---------------------------------------------------------------

    async def _menu(self, key: tuple[str, str], dialog: Dialog, page: int) -> Screen:
        lang = dialog.language
        offer = await self._offer(dialog)
        if not offer.eligible:
            return self._close(key, await self._refusal(dialog, offer.reason))
        menu = self._menus.get((lang, offer))
        if menu is None:
            items = [(str(t.tier_id), self._menu_item(t, lang)) for t in offer.tiers if t.fits]
            if not items:
                return self._close(key, await self._refusal(dialog, "CEILING_REACHED"))
            title = self._t.render("menu_title", lang, {"debt": offer.debt_minor, "headroom": offer.headroom_minor})
            pages = paginate(
                title,
                items,
                more=self._t.render("menu_more", lang),
                tail=self._t.render("menu_account", lang),
            )
            menu = title, pages
            if len(self._menus) >= MENUS_KEPT_MAX:
                self._menus.clear()
            self._menus[(lang, offer)] = menu
        title, dialog.pages = menu
        dialog.step = Step.MENU
        dialog.page = min(page, len(dialog.pages) - 1)
        return Screen(render_page(title, dialog.pages[dialog.page]), final=False)

    def _menu_item(self, tier: Any, lang: str) -> str:
        bundle = getattr(tier, "bundle", None)
        if bundle is None:
            return self._t.render("menu_item", lang, {"option": tier.tier_id, "amount": tier.amount_minor})
        return self._t.render("menu_item_bundle", lang, {
            "option": tier.tier_id, "amount": tier.amount_minor, "bundle": bundle.as_param()})

    async def _confirm(self, key: tuple[str, str], dialog: Dialog, tier_id: int) -> Screen:
        lang = dialog.language
        offer = await self._offer(dialog)
        if not offer.eligible:
            return self._close(key, await self._refusal(dialog, offer.reason))
        tier = next((t for t in offer.tiers if t.tier_id == tier_id), None)
        if tier is None:
            return self._close(key, await self._refusal(dialog, "TIER_NOT_ALLOWED"))
        if not tier.fits:
            return self._close(key, await self._refusal(dialog, "CEILING_REACHED"))
        dialog.step = Step.CONFIRM
        dialog.tier_id = tier_id
        dialog.quoted = (tier.amount_minor, tier.fee_minor, tier.total_minor)
        params: dict[str, Any] = {
            "amount": tier.amount_minor, "fee": tier.fee_minor, "total": tier.total_minor,
            "fee_percent": fee_percent(tier.fee_minor, tier.amount_minor)}
        bundle = getattr(tier, "bundle", None)
        if bundle is not None:
            params["bundle"] = bundle.as_param()
        text = self._t.render("confirm" if bundle is None else "confirm_bundle", lang, params)
        return Screen(text, final=False)

    async def _lend(self, key: tuple[str, str], dialog: Dialog) -> Screen:
        lang = dialog.language
        assert dialog.tier_id is not None
        # The subscriber agreed to the figures on his screen. If the tariff changed since
        # (a config reload), he is shown the new figures and asked again, never charged
        # a fee he was not shown.
        offer = await self._offer(dialog)
        tier = next((t for t in offer.tiers if t.tier_id == dialog.tier_id), None)
        if tier is not None and tier.fits and dialog.quoted != (
            tier.amount_minor, tier.fee_minor, tier.total_minor
        ):
            return await self._confirm(key, dialog, dialog.tier_id)
        dialog.step = Step.BUSY
        # The final screen goes out on the IN's answer, not after the ledger's fsync
        # (see LendingService.borrow: a lost settlement is redone by the resolver).
        outcome = await self._lending.borrow(
            dialog.msisdn, dialog.tier_id, "ussd", f"ussd:{dialog.dialog_id}:confirm",
            answer_early=True,
        )
        status = str(getattr(outcome.status, "value", outcome.status)).upper()
        bundle = getattr(tier, "bundle", None) if tier is not None else None
        if status == "GRANTED" and bundle is not None:
            text = self._t.render("granted_screen_bundle", lang, {
                "bundle": bundle.as_param(), "amount": outcome.amount_minor,
                "debt": outcome.debt_minor})
        elif status == "GRANTED":
            text = self._t.render(
                "granted_screen", lang, {"amount": outcome.amount_minor, "debt": outcome.debt_minor}
            )
        elif status == "PENDING":
            text = self._t.render("pending_screen", lang, {"amount": outcome.amount_minor})
        else:
            return self._close(key, self._refused(lang, _reason_code(outcome.reason)))
        return self._close(key, Screen(text, final=True))

    async def _offer(self, dialog: Dialog) -> Any:
        """The dialog's offer, read again only when the policy changed since (a reload:
        the fee may differ, and the subscriber must see what he will pay)."""
        if dialog.offer is None or dialog.offer_policy is not self._lending.policy:
            self._keep_offer(dialog, await self._lending.quote(dialog.msisdn))
        return dialog.offer

    def _keep_offer(self, dialog: Dialog, offer: Any) -> None:
        dialog.offer, dialog.offer_policy = offer, self._lending.policy

    async def _account(self, key: tuple[str, str], dialog: Dialog, saved: bool = False,
                       note: str | None = None) -> Screen:
        lang = dialog.language
        status, offer = await self._lending.overview(dialog.msisdn)
        self._keep_offer(dialog, offer)
        dialog.step = Step.ACCOUNT
        on, off = self._t.render("on", lang), self._t.render("off", lang)
        text = self._t.render(
            "account_screen", lang,
            {
                "debt": offer.debt_minor,
                "headroom": offer.headroom_minor,
                "auto": on if _attr(status, "auto_advance_opt_in") else off,
                "ads": off if _attr(status, "ads_opt_out") else on,
            },
        )
        limit = _attr(status, "limit")
        if limit is not None and self._t.has("account_limit", lang):
            # Limits from behaviour: his limit and why, above the screen when it fits.
            why_key = f"limit_{limit.reason.value}"
            why = self._t.render(why_key, lang) if self._t.has(why_key, lang) else ""
            line = self._t.render("account_limit", lang, {"limit": limit.limit_minor, "why": why})
            if screen_capacity(f"{line}\n{text}") >= 0:
                text = f"{line}\n{text}"
        if saved or note:
            text = f"{self._t.render(note or 'settings_saved', lang)}\n{text}"
            if screen_capacity(text) < 0:
                text = text.split("\n", 1)[1]
        return Screen(text, final=False)

    async def _refusal(self, dialog: Dialog, reason: Any) -> Screen:
        """A refusal decided at the menu, before any borrow: recorded like one the
        lending service decides (EDR, eb_refusals_total, the consent trail when a
        protection preset keeps one), then shown."""
        self._lending.record_refusal(dialog.msisdn, _reason_code(reason), "ussd")
        await self._lending.record_consent(dialog.msisdn, "loan_refused", "ussd",
                                           {"reason": _reason_code(reason)})
        return self._refused(dialog.language, reason)

    def _refused(self, lang: str, reason: Any) -> Screen:
        return Screen(self._t.render("refused_screen", lang, {"reason": _reason_code(reason)}), True)


def _attr(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _reason_code(reason: Any) -> str:
    return str(getattr(reason, "value", reason) or "IN_REFUSED")


_CODE_RE = re.compile(r"^\*(\d+)((?:\*\d+)*)#$")


def _parse_code(code: str, service_code: str) -> list[int] | None:
    """`*123#` → [], `*123*4#` → [4], anything else for another service → None."""
    match = _CODE_RE.match(code.replace(" ", ""))
    if match is None or match.group(1) != service_code:
        return None
    rest = [p for p in match.group(2).split("*") if p]
    if len(rest) > 1:
        return None
    return [int(p) for p in rest]


def paginate(
    title: str, items: list[tuple[str, str]], *, more: str, tail: str
) -> list[list[tuple[str, str]]]:
    """Greedy split of menu lines so that every page (title + lines + nav) fits a
    screen, measured in the encoding the page goes out in (GSM 7-bit septets or UCS2
    characters). A page that is not the last carries only the `more` line; the last
    one carries `tail`: each page is filled up to the limit."""
    more_line = (more.split(" ", 1)[0], more)
    tail_line = (tail.split(" ", 1)[0], tail)
    pages: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for item in items:
        if current and screen_capacity(render_page(title, [*current, item, more_line])) < 0:
            pages.append([*current, more_line])
            current = []
        current.append(item)
    # The last page ends with `tail` instead: what no longer fits goes to one more page.
    moved: list[tuple[str, str]] = []
    while current and screen_capacity(render_page(title, [*current, tail_line])) < 0:
        moved.insert(0, current.pop())
    if moved:
        pages.append([*current, more_line])
        current = moved
    pages.append([*current, tail_line])
    for page in pages:
        if screen_capacity(render_page(title, page)) < 0:
            raise ValueError("a single menu line does not fit on a USSD screen")
    return pages


@functools.lru_cache(maxsize=4096)  # the same screens again and again (menus, confirms)
def screen_capacity(text: str) -> int:
    """Room left on one USSD screen for `text` (negative: it does not fit)."""
    if is_gsm7(text):
        return SCREEN_GSM7_MAX - gsm7_length(text)
    return SCREEN_UCS2_MAX - len(text.encode("utf-16-be")) // 2


def split_screen(text: str, more: str) -> list[str]:
    """Split `text` into parts that each fit one screen, every part but the last ending
    with the `more` line. Whole lines are kept together; only a line too long for a
    screen of its own is broken, between words."""
    lines: list[str] = []
    for line in text.split("\n"):
        if screen_capacity(line + "\n" + more) >= 0:
            lines.append(line)
            continue
        chunk = ""
        for word in line.split(" "):
            trial = f"{chunk} {word}" if chunk else word
            if chunk and screen_capacity(trial + "\n" + more) < 0:
                lines.append(chunk)
                chunk = word
            else:
                chunk = trial
        lines.append(chunk)
    parts: list[str] = []
    current: list[str] = []
    for line in lines:
        if current and screen_capacity("\n".join([*current, line, more])) < 0:
            parts.append("\n".join([*current, more]))
            current = []
        current.append(line)
    parts.append("\n".join(current))
    return parts


def render_page(title: str, lines: list[tuple[str, str]]) -> str:
    return "\n".join([title, *(line for _, line in lines)])
