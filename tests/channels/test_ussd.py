"""USSD dialogs: every menu path, in English and Arabic, against the real rules."""

from __future__ import annotations

import itertools

import pytest

from extrabalance.config import load_settings
from extrabalance.service.templates import Templates
from extrabalance.service.ussd import (
    SCREEN_GSM7_MAX,
    SCREEN_UCS2_MAX,
    Screen,
    UssdDialogs,
    UssdInput,
    paginate,
    screen_capacity,
)
from tests.channels.fake_lending import FakeLending

A = "201001234567"  # regular segment: tenure 400 d, ARPU 50.00
V = "201001111111"  # vip: all 12 tiers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings():
    return load_settings()


@pytest.fixture
def templates(settings):
    return Templates(settings.templates, "en", settings.node.currency_exponent)


@pytest.fixture
def lending(settings):
    fake = FakeLending(settings.policy())
    fake.add(A, 400, 5000)
    fake.add(V, 1000, 30000)
    return fake


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def dialogs(lending, templates, clock):
    return UssdDialogs(lending, templates, timeout_s=60, clock=clock)


# The dialog step (its_session_info sequence) a gateway gives each input, per dialog.
_steps: dict[tuple[int, str, str], int] = {}


async def dial(d: UssdDialogs, text: str, msisdn: str = A, key: str = "7") -> Screen:
    _steps[(id(d), msisdn, key)] = 0
    return await d.handle(UssdInput(msisdn, key, text, new_dialog=True, step=0))


async def reply(d: UssdDialogs, text: str, msisdn: str = A, key: str = "7") -> Screen:
    step = _steps.get((id(d), msisdn, key), 0) + 2  # the gateway's next input
    _steps[(id(d), msisdn, key)] = step
    return await d.handle(UssdInput(msisdn, key, text, new_dialog=False, step=step))


def fits(screen: Screen) -> bool:
    return screen_capacity(screen.text) >= 0


async def test_menu_pick_confirm_lends_once(dialogs, lending):
    menu = await dial(dialogs, "*123#")
    assert not menu.final and fits(menu)
    assert menu.text.startswith("Extra Balance (owe 0.00 EGP, can borrow 25.00 EGP)")
    assert "4 5.00 EGP" in menu.text
    confirm = await reply(dialogs, "4")
    assert confirm.text.startswith("Borrow 5.00 EGP? Fee 0.50 EGP (10%). You repay 5.50 EGP")
    assert not confirm.final
    done = await reply(dialogs, "1")
    assert done.final
    assert done.text == "Done: 5.00 EGP added to your balance. You owe 5.50 EGP."
    assert lending.borrow_calls == 1
    # The gateway repeats the confirm after the dialog closed (same step): no second
    # loan, and no second final screen either.
    step = _steps[(id(dialogs), A, "7")]
    assert await dialogs.handle(UssdInput(A, "7", "1", new_dialog=False, step=step)) is None
    # A new input of the ended dialog finds it gone.
    again = await reply(dialogs, "1")
    assert again.final and "expired" in again.text
    assert lending.borrow_calls == 1
    assert len(dialogs) == 0


async def test_a_loan_dialog_reads_the_subscriber_once(dialogs, lending):
    """Menu, confirm and loan are shown from the offer read when the dialog opened;
    only the loan itself goes back to the ledger (where it is decided again)."""
    await dial(dialogs, "*123#")
    await reply(dialogs, "4")
    done = await reply(dialogs, "1")
    assert done.final and lending.borrow_calls == 1
    assert lending.reads == 1
    await dial(dialogs, "*123*2#", key="8")
    await reply(dialogs, "1", key="8")
    assert lending.reads == 2 and lending.borrow_calls == 2


async def test_a_debt_grown_during_the_dialog_is_refused_by_the_loan(dialogs, lending):
    """The confirm screen shows the offer of the dialog's start; a loan taken meanwhile
    on another channel makes the confirmed tier too big, and the loan decides that."""
    lending.add(A, 1000, 3000)
    await dial(dialogs, "*123*8#")
    await lending.borrow(A, 8, "sms", "sms:elsewhere")
    screen = await reply(dialogs, "1")
    assert screen.final and "Sorry" in screen.text
    assert lending.borrow_calls == 2


async def test_shortcut_goes_straight_to_confirm(dialogs):
    screen = await dial(dialogs, "*123*2#")
    assert screen.text.startswith("Borrow 2.00 EGP? Fee 0.20 EGP (10%). You repay 2.20 EGP")


async def test_shortcut_for_a_tier_the_segment_lacks(dialogs):
    screen = await dial(dialogs, "*123*12#")
    assert screen.final
    assert screen.text == "Sorry, no Extra Balance now: this amount is not offered to your line"


async def test_cancel(dialogs, lending):
    await dial(dialogs, "*123*2#")
    screen = await reply(dialogs, "2")
    assert screen.final and screen.text.startswith("Cancelled")
    assert lending.borrow_calls == 0


async def test_invalid_choice_repeats_the_screen_with_a_hint(dialogs):
    menu = await dial(dialogs, "*123#")
    screen = await reply(dialogs, "42")
    assert not screen.final
    assert screen.text.startswith("Please choose a number from the menu.")
    assert fits(screen)
    # On a full screen the hint takes the title's place; every option stays.
    assert menu.text.splitlines()[1:] == screen.text.splitlines()[1:]


async def test_vip_menu_is_paginated_never_cut(dialogs):
    first = await dial(dialogs, "*123#", msisdn=V)
    pages = [first]
    while "99 More" in pages[-1].text:
        pages.append(await reply(dialogs, "99", msisdn=V))
    assert len(pages) >= 2
    assert all(fits(p) for p in pages)
    shown = " ".join(p.text for p in pages)
    for tier_line in ("1 1.00 EGP", "12 50.00 EGP"):
        assert tier_line in shown
    # A tier from another page can still be chosen from the last page shown? No:
    # only the options on the current screen are valid.
    assert (await reply(dialogs, "1", msisdn=V)).text.startswith("Please choose")


async def test_duplicate_opening_gets_no_second_screen(dialogs, lending):
    one = await dial(dialogs, "*123#")
    assert not one.final
    assert await dial(dialogs, "*123#") is None  # same step: the gateway's repeat
    assert len(dialogs) == 1


async def test_duplicate_confirm_while_open_never_lends_twice(dialogs, lending):
    await dial(dialogs, "*123*4#")
    first = await reply(dialogs, "1")
    # Same deliver_sm again under the same dialog id, as a new dialog of the same key
    # (gateways reuse short session numbers): a new dialog, and a fresh key.
    assert first.final
    assert lending.borrow_calls == 1


async def test_refused_reason_on_first_screen(dialogs, lending):
    lending.add("201009999999", 30, 0)  # too new
    screen = await dial(dialogs, "*123#", msisdn="201009999999")
    assert screen.final
    assert screen.text == "Sorry, no Extra Balance now: your line is too new"


async def test_ceiling_refusal_when_nothing_fits(dialogs, lending):
    for _ in range(3):
        await dial(dialogs, "*123*8#", key="1")  # 20.00 + 2.00
        await reply(dialogs, "1", key="1")
        break
    screen = await dial(dialogs, "*123*8#", key="2")
    assert screen.final and "limit" in screen.text


async def test_pending_outcome_screen(dialogs, lending):
    lending.pending = True
    await dial(dialogs, "*123*1#")
    screen = await reply(dialogs, "1")
    assert screen.final
    assert screen.text.startswith("Your request for 1.00 EGP is being processed")


async def test_account_toggles_and_language(dialogs, lending):
    await dial(dialogs, "*123#")
    account = await reply(dialogs, "0")
    assert "Auto-advance: off" in account.text and "Offers by SMS: on" in account.text
    assert fits(account)
    toggled = await reply(dialogs, "1")
    assert toggled.text.startswith("Saved.") and "Auto-advance: on" in toggled.text
    assert lending.states[A].auto_advance_opt_in is True
    ads = await reply(dialogs, "2")
    assert "Offers by SMS: off" in ads.text
    assert lending.states[A].ads_opt_out is True
    arabic = await reply(dialogs, "3")
    assert lending.states[A].language == "ar"
    assert "تلقائي: مفعل" in arabic.text and "3 English" in arabic.text
    assert fits(arabic)
    menu = await reply(dialogs, "9")
    assert menu.text.startswith("رصيد إضافي")
    assert fits(menu)


async def test_arabic_menu_paths_paginate_within_80(dialogs, lending):
    await lending.set_preferences(V, language="ar")
    first = await dial(dialogs, "*123#", msisdn=V)
    assert screen_capacity(first.text) >= 0
    assert len(first.text) <= SCREEN_UCS2_MAX
    pages = [first]
    while "99 المزيد" in pages[-1].text:
        pages.append(await reply(dialogs, "99", msisdn=V))
    assert len(pages) >= 3
    confirm = await reply(dialogs, pages[-1].text.splitlines()[1].split(" ")[0], msisdn=V)
    assert confirm.text.startswith("سلفة") and screen_capacity(confirm.text) >= 0
    done = await reply(dialogs, "1", msisdn=V)
    assert done.final and done.text.startswith("تم: أضيف")


async def test_dialog_timeout(dialogs, clock, lending):
    await dial(dialogs, "*123*1#")
    clock.now += 61
    screen = await reply(dialogs, "1")
    assert screen.final and "expired" in screen.text
    assert lending.borrow_calls == 0
    assert dialogs.stats["expired"] == 1


async def test_abort_releases_the_dialog(dialogs, lending):
    await dial(dialogs, "*123*1#")
    dialogs.abort(A, "7")
    assert len(dialogs) == 0
    assert (await reply(dialogs, "1")).final
    assert lending.borrow_calls == 0


async def test_many_concurrent_dialogs_are_independent(dialogs, lending):
    for i in range(50):
        msisdn = f"2010020{i:05d}"
        lending.add(msisdn, 400, 5000)
        await dial(dialogs, "*123*1#", msisdn=msisdn, key=str(i % 3))
    for i in range(50):
        msisdn = f"2010020{i:05d}"
        assert (await reply(dialogs, "1", msisdn=msisdn, key=str(i % 3))).final
    assert lending.borrow_calls == 50


async def test_other_service_code_is_refused(dialogs):
    screen = await dial(dialogs, "*555#")
    assert screen.final


def test_bounded_dialog_table(lending, templates, clock):
    small = UssdDialogs(lending, templates, dialogs_max=3, clock=clock)
    import asyncio

    async def run() -> None:
        for i in range(5):
            await small.handle(UssdInput(A, str(i), "*123#", True))

    asyncio.run(run())
    assert len(small) == 3 and small.stats["evicted"] == 2


def test_paginate_keeps_every_line():
    items = [(str(i), f"{i} {'x' * 30}") for i in range(1, 13)]
    pages = paginate("title", items, more="99 More", tail="0 Account")
    flat = [opt for page in pages for opt, _ in page if opt not in ("99", "0")]
    assert flat == [str(i) for i in range(1, 13)]
    for page in pages:
        assert screen_capacity("\n".join(["title", *(line for _, line in page)])) >= 0
    assert SCREEN_GSM7_MAX == 182


async def test_changed_tariff_is_shown_again_before_lending(dialogs, lending, settings):
    """A reload between the confirm screen and '1': the new fee is shown, nothing lent."""
    import dataclasses

    await dial(dialogs, "*123*4#")
    plans = dict(lending.policy.fee_plans)
    plans["standard"] = dataclasses.replace(plans["standard"], percent_bp=2000)
    lending.policy = dataclasses.replace(lending.policy, fee_plans=plans)
    screen = await reply(dialogs, "1")
    assert not screen.final and screen.text.startswith("Borrow 5.00 EGP? Fee 1.00 EGP (20%).")
    assert lending.borrow_calls == 0
    done = await reply(dialogs, "1")
    assert done.final and lending.borrow_calls == 1


async def test_every_confirm_screen_fits_in_both_languages(dialogs, lending):
    """The largest amounts, fees and totals still make one screen in each language."""
    for lang in ("en", "ar"):
        msisdn = f"20100333333{'1' if lang == 'en' else '2'}"
        lending.add(msisdn, 1000, 30000)
        await lending.set_preferences(msisdn, language=lang)
        for tier in range(1, 13):
            screen = await dial(dialogs, f"*123*{tier}#", msisdn=msisdn, key=f"{lang}{tier}")
            assert not screen.final and fits(screen), (lang, tier, screen.text)
            assert screen.text.splitlines()[-1].startswith("2 ")


async def test_a_screen_too_long_is_split_never_cut(lending, settings, clock):
    """A template an operator made too long: parts with "99 More", options still work."""
    tables = {k: dict(v) for k, v in settings.templates.items()}
    tables["en"]["confirm"] = ("Borrow {amount} now? " + "Terms apply to this offer. " * 8
                               + "Fee {fee}, repay {total}.\n1 Confirm\n2 Cancel")
    from extrabalance.service.templates import Templates

    d = UssdDialogs(lending, Templates(tables, "en", 2), clock=clock)
    first = await dial(d, "*123*4#")
    assert fits(first) and first.text.endswith("99 More") and not first.final
    parts = [first]
    while parts[-1].text.endswith("99 More"):
        parts.append(await reply(d, "99"))
    assert all(fits(p) for p in parts)
    joined = " ".join(p.text.replace("\n99 More", "") for p in parts)
    assert "Fee 0.50 EGP, repay 5.50 EGP." in joined and parts[-1].text.endswith("2 Cancel")
    done = await reply(d, "1")
    assert done.final and lending.borrow_calls == 1


async def test_arabic_indic_digits_are_menu_input(dialogs, lending):
    """As in SMS (`سلفة ٥`): "٢" picks tier 2 and "۱" (Eastern Arabic-Indic) confirms."""
    await lending.set_preferences(A, language="ar")
    await dial(dialogs, "*123#")
    confirm = await reply(dialogs, "٢")
    assert confirm.text.startswith("سلفة") and not confirm.final
    done = await reply(dialogs, "۱")
    assert done.final and done.text.startswith("تم: أضيف")
    assert lending.borrow_calls == 1


async def test_arabic_menu_pages_are_filled_to_the_ucs2_limit(dialogs, lending):
    await lending.set_preferences(V, language="ar")
    pages = [await dial(dialogs, "*123#", msisdn=V)]
    while "99 المزيد" in pages[-1].text:
        pages.append(await reply(dialogs, "99", msisdn=V))
    tiers = [line.split(" ")[0] for p in pages for line in p.text.splitlines()[1:-1]]
    assert tiers == [str(i) for i in range(1, 13)]
    title = pages[0].text.splitlines()[0]
    for page, following in itertools.pairwise(pages):
        lines = page.text.splitlines()
        # the next page's first tier would not have fitted on this one
        fuller = "\n".join([title, *lines[1:-1], following.text.splitlines()[1], lines[-1]])
        assert screen_capacity(fuller) < 0
    assert len(pages) <= 6  # tier 8 no longer takes seven "99"


async def test_account_shows_the_limit_from_behaviour_and_why(dialogs, lending, monkeypatch):
    from types import SimpleNamespace

    from extrabalance.core.limits import Limit, LimitReason

    limit = Limit(2000, LimitReason.RECHARGES, 4000, 2000, 0)
    plain = lending.overview

    async def overview(msisdn):
        state, quote = await plain(msisdn)
        shown = {f: getattr(state, f) for f in ("auto_advance_opt_in", "ads_opt_out", "language")}
        return SimpleNamespace(**shown, limit=limit), quote

    monkeypatch.setattr(lending, "overview", overview)
    await dial(dialogs, "*123#")
    account = await reply(dialogs, "0")
    assert account.text.startswith("Your limit: 20.00 EGP (from your recharges)\nYou owe")
    assert fits(account)
    # The Arabic screen (UCS-2, 80 characters) has no room left: the line is left out
    # rather than the screen cut; the headroom shown already follows the limit.
    arabic = await reply(dialogs, "3")
    assert arabic.text.startswith("الدين ") and "حدك" not in arabic.text
    assert fits(arabic)


async def test_a_cancelled_confirm_is_a_declined_consent_with_the_figures(dialogs, lending):
    await dial(dialogs, "*123*4#")
    done = await reply(dialogs, "2")
    assert done.final and lending.borrow_calls == 0
    assert lending.consents == [(A, "loan_declined", "ussd")]


async def test_double_opt_in_says_the_sms_is_on_its_way(dialogs, lending, monkeypatch):
    """Turning auto-advance on under a double opt-in: the account screen says to
    reply YES to the SMS, and the setting stays off."""

    async def waits_for_reply(msisdn, **changes):
        return "confirm_by_sms"

    monkeypatch.setattr(lending, "set_preferences", waits_for_reply)
    await dial(dialogs, "*123*0#")
    screen = await reply(dialogs, "1")
    assert not screen.final and fits(screen)
    assert screen.text.startswith("Reply YES to our SMS to turn it on.\n")
    assert "1 Auto-advance: off" in screen.text


async def test_a_refusal_at_the_menu_goes_on_the_consent_trail_too(dialogs, lending):
    lending.add("201001111111", 10, 5000)  # too new a line
    screen = await dial(dialogs, "*123#", msisdn="201001111111", key="n1")
    assert screen.final and lending.refusals[-1][0] == "201001111111"
    assert lending.consents == [("201001111111", "loan_refused", "ussd")]
