"""A gateway repeats a subscriber's input (new SMPP sequence number, same
its_session_info): the repeat never advances the dialog, never lends, and gets no
screen of its own (never a second final screen)."""

from __future__ import annotations

import asyncio
import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extrabalance.adapters.smpp_channel import SmppChannel
from extrabalance.adapters.sms_notifier import SmsNotifier
from extrabalance.config import load_settings
from extrabalance.service.templates import Templates
from extrabalance.service.ussd import Screen, UssdDialogs, UssdInput
from extrabalance.smpp.pdu import ItsSessionInfo, UssdOp
from extrabalance.smpp.ussd import ussd_deliver
from tests.channels.fake_lending import FakeLending

A = "201001234567"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowLending(FakeLending):
    """Every ledger read and loan takes a loop turn or two, as a real one does."""

    async def overview(self, msisdn):
        await asyncio.sleep(0)
        return await super().overview(msisdn)

    async def borrow(self, *args, **kwargs):
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return await super().borrow(*args, **kwargs)


def make(clock: Clock | None = None) -> tuple[UssdDialogs, FakeLending]:
    s = load_settings()
    lending = SlowLending(s.policy())
    lending.add(A, 400, 5000)
    t = Templates(s.templates, "en", s.node.currency_exponent)
    return UssdDialogs(lending, t, clock=clock or Clock()), lending


def inp(text: str, step: int | None, new: bool = False) -> UssdInput:
    return UssdInput(A, "7", text, new_dialog=new, step=step)


async def test_repeated_tier_choice_is_not_taken_as_confirm():
    """The issue's scenario: "1" picks tier 1, its repeat must not confirm the loan, and
    the subscriber's real next input ("2 Cancel") still finds the dialog."""
    d, lending = make()
    menu = await d.handle(inp("*123#", 0, new=True))
    assert "1 1.00 EGP" in menu.text
    confirm = await d.handle(inp("1", 2))
    assert confirm.text.startswith("Borrow 1.00 EGP?")
    assert await d.handle(inp("1", 2)) is None  # the gateway's repeat: no screen, no step
    assert lending.borrow_calls == 0
    cancelled = await d.handle(inp("2", 4))
    assert cancelled.final and "cancel" in cancelled.text.lower()
    assert lending.borrow_calls == 0
    assert d.stats["repeats"] == 1


async def test_repeated_confirm_gets_no_second_final_screen():
    d, lending = make()
    await d.handle(inp("*123*4#", 0, new=True))
    done = await d.handle(inp("1", 2))
    assert done.final and done.text.startswith("Done")
    assert await d.handle(inp("1", 2)) is None
    assert await d.handle(inp("*123*4#", 0, new=True)) is None  # the opening, late
    assert lending.borrow_calls == 1


async def test_repeat_of_an_older_input_is_not_answered_with_its_old_screen():
    d, lending = make()
    await d.handle(inp("*123#", 0, new=True))
    await d.handle(inp("4", 2))
    # The opening's repeat arrives after the confirm screen: nothing, not the menu.
    assert await d.handle(inp("*123#", 0, new=True)) is None
    assert (await d.handle(inp("1", 4))).final
    assert lending.borrow_calls == 1


async def test_repeat_while_the_first_copy_is_still_handled_sends_nothing():
    d, lending = make()
    screens = await asyncio.gather(d.handle(inp("*123*4#", 0, new=True)),
                                   d.handle(inp("*123*4#", 0, new=True)))
    assert sum(s is not None for s in screens) == 1
    screens = await asyncio.gather(d.handle(inp("1", 2)), d.handle(inp("1", 2)))
    assert sum(s is not None for s in screens) == 1
    assert lending.borrow_calls == 1


async def test_without_step_numbers_the_same_text_within_the_window_is_a_repeat():
    clock = Clock()
    d, lending = make(clock)
    await d.handle(inp("*123#", None, new=True))
    clock.now += 5
    confirm = await d.handle(inp("1", None))
    clock.now += 1  # within the 2 s window: the gateway's repeat
    assert confirm.text.startswith("Borrow") and await d.handle(inp("1", None)) is None
    assert lending.borrow_calls == 0
    clock.now += 5  # a subscriber's own "1 Confirm", seconds later
    assert (await d.handle(inp("1", None))).final
    assert lending.borrow_calls == 1


# -- through the channel, as the gateway sends it ------------------------------------


async def test_channel_repeat_with_a_new_sequence_number_never_lends():
    s = load_settings()
    t = Templates(s.templates, "en", 2)
    lending = SlowLending(s.policy())
    lending.add(A, 400, 5000)
    screens: list[tuple[str, bool]] = []

    async def submit(pdu, **_):
        screens.append((pdu.short_message.decode(), pdu.its_session_info.end_of_session))

    async def send_sms(source, dest, text, *, registered_delivery=True):
        return []

    dialogs = UssdDialogs(lending, t)
    ch = SmppChannel(dialogs=dialogs, lending=lending, templates=t,
                     policy=lending.policy, submit=submit,
                     sms=SmsNotifier(send_sms, templates=t, short_code="1234"))
    seq = iter(range(100, 200))

    def deliver(text: str, step: int, op: int = UssdOp.USSR_CONFIRM) -> None:
        pdu = ussd_deliver(A, "*123#", text, op=op, session=ItsSessionInfo(9, step))
        pdu = dataclasses.replace(pdu, sequence_number=next(seq))
        assert ch.on_deliver(pdu, "bind-1") == 0

    deliver("*123#", 0, UssdOp.PSSR_INDICATION)
    await asyncio.sleep(0.01)
    deliver("1", 2)
    deliver("1", 2)  # repeated before the first was answered
    await asyncio.sleep(0.01)
    deliver("1", 2)  # and after
    await asyncio.sleep(0.01)
    deliver("2", 4)
    await asyncio.sleep(0.01)
    assert lending.borrow_calls == 0
    # menu, confirm, then the real "2 Cancel": the repeats got no screen
    assert [final for _, final in screens] == [False, False, True]
    assert screens[1][0].startswith("Borrow") and "ancel" in screens[-1][0]
    assert dialogs.stats["repeats"] == 2 and ch.stats["ussd_repeats"] == 2


# -- property: repeats, in any order, never lend without consent ----------------------

TEXTS = ("1", "2", "4", "99", "0", "9", "x")


@st.composite
def scripts(draw):
    """A subscriber's inputs (each answering the screen it sees) and the gateway's
    repeats: right after, concurrently, or of an older input later on; or an abort."""
    n = draw(st.integers(1, 8))
    steps = []
    for _ in range(n):
        text = draw(st.sampled_from(TEXTS))
        how = draw(st.sampled_from(("none", "after", "concurrent", "old", "abort")))
        steps.append((text, how))
    opening = draw(st.sampled_from(("*123#", "*123*4#", "*123*1#")))
    return opening, steps


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts())
def test_loans_equal_confirms_that_answered_a_confirm_screen(script):
    """For any interleaving of repeats, concurrent copies and aborts, the loans equal
    the confirm inputs that answered a confirm screen (at most one per dialog)."""
    opening, steps = script

    async def run() -> None:
        d, lending = make()
        seen = await d.handle(inp(opening, 0, new=True))
        sent: list[tuple[int, str]] = [(0, opening)]
        consents = 0
        finals = int(seen.final)
        for i, (text, how) in enumerate(steps, start=1):
            step = 2 * i
            answered_confirm = (seen is not None and not seen.final
                                and "Borrow" in seen.text and text == "1")
            if how == "abort":  # the gateway aborts the dialog, then the input comes anyway
                d.abort(A, "7")
                seen = Screen("aborted", final=True)
            if how == "concurrent":
                results = await asyncio.gather(d.handle(inp(text, step)),
                                               d.handle(inp(text, step)))
            else:
                results = [await d.handle(inp(text, step))]
                if how == "after":
                    results.append(await d.handle(inp(text, step)))
                elif how == "old":
                    old_step, old_text = sent[len(sent) // 2]
                    late = await d.handle(inp(old_text, old_step, new=old_step == 0))
                    assert late is None  # an older input's repeat changes nothing
            sent.append((step, text))
            shown = [r for r in results if r is not None]
            assert len(shown) == 1  # one screen per input: its repeat gets none
            if seen is not None and seen.final:
                # after the final screen, a new input gets the "expired" screen only
                assert "expired" in shown[0].text
                continue
            if answered_confirm:
                consents += 1
            finals += int(shown[0].final)
            seen = shown[0]
        granted = [o for o in lending.outcomes.values() if o.status == "GRANTED"]
        assert len(granted) == consents <= 1
        assert finals <= 1

    asyncio.run(run())


async def test_an_earlier_screen_is_never_sent_again_after_a_later_one():
    """Whatever makes the ESME re-send a screen (throttling, a lost bind, a timeout
    when allowed), it stops once a later screen of the dialog went out."""
    s = load_settings()
    t = Templates(s.templates, "en", 2)
    lending = SlowLending(s.policy())
    lending.add(A, 400, 5000)
    wanted: list = []

    async def submit(pdu, resend_if=None):
        wanted.append(resend_if)

    async def send_sms(source, dest, text, *, registered_delivery=True):
        return []

    ch = SmppChannel(dialogs=UssdDialogs(lending, t), lending=lending, templates=t,
                     policy=lending.policy, submit=submit,
                     sms=SmsNotifier(send_sms, templates=t, short_code="1234"))
    for step, (text, op) in enumerate((("*123#", UssdOp.PSSR_INDICATION),
                                       ("4", UssdOp.USSR_CONFIRM))):
        ch.on_deliver(ussd_deliver(A, "*123#", text, op=op,
                                   session=ItsSessionInfo(9, 2 * step)), "bind-1")
        await asyncio.sleep(0.01)
    assert len(wanted) == 2 and all(callable(w) for w in wanted)
    assert [w() for w in wanted] == [False, True]  # the menu: never again
    ch.on_deliver(ussd_deliver(A, "*123#", "1", session=ItsSessionInfo(9, 4),
                               op=UssdOp.USSR_CONFIRM), "bind-1")
    await asyncio.sleep(0.01)
    assert len(wanted) == 3
    assert [w() for w in wanted] == [False, False, False]  # the final screen went out


async def test_its_session_info_sequence_is_echoed_for_gateways_that_want_it():
    s = load_settings()
    t = Templates(s.templates, "en", 2)
    lending = SlowLending(s.policy())
    lending.add(A, 400, 5000)
    for mode, wanted in (("increment", 4), ("echo", 3)):
        answers = []

        async def submit(pdu, answers=answers, **_):
            answers.append(pdu.its_session_info)

        async def send_sms(source, dest, text, *, registered_delivery=True):
            return []

        ch = SmppChannel(dialogs=UssdDialogs(lending, t), lending=lending, templates=t,
                         policy=lending.policy, submit=submit,
                         sms=SmsNotifier(send_sms, templates=t, short_code="1234"),
                         its_sequence=lambda bind, m=mode: m)
        ch.on_deliver(ussd_deliver(A, "*123#", "*123#", op=UssdOp.PSSR_INDICATION,
                                   session=ItsSessionInfo(5, 3)), "bind-1")
        await asyncio.sleep(0.01)
        assert [(a.session_number, a.sequence_number) for a in answers] == [(5, wanted)]
