"""A refusal at the USSD menu ("your line is too new") is recorded like an SMS one: an
EDR `refusal` line (and so eb_refusals_total, the status page and the report), once
per dialog; a refusal the borrow itself decides is not recorded twice."""

from __future__ import annotations

import pytest

from extrabalance.config import load_settings
from extrabalance.service.templates import Templates
from extrabalance.service.ussd import UssdDialogs, UssdInput
from tests.channels.fake_lending import FakeLending
from tests.service.fakes import Harness

NEW = "201009999999"


def _templates():
    s = load_settings()
    return Templates(s.templates, "en", s.node.currency_exponent)


async def test_menu_refusal_is_recorded_once() -> None:
    lending = FakeLending(load_settings().policy())
    lending.add(NEW, 30, 0)  # too new
    dialogs = UssdDialogs(lending, _templates())
    screen = await dialogs.handle(UssdInput(NEW, "7", "*123#", new_dialog=True))
    assert screen.final and "too new" in screen.text
    assert lending.refusals == [(NEW, "TENURE_TOO_SHORT", "ussd")]


@pytest.fixture
async def h(tmp_path):
    harness = Harness(tmp_path / "ledger.db")
    yield harness
    await harness.close()


async def test_menu_refusal_reaches_the_events_like_an_sms_refusal(h) -> None:
    await h.add_profile(NEW, tenure_days=30, arpu_minor=0)
    dialogs = UssdDialogs(h.lending, _templates())
    screen = await dialogs.handle(UssdInput(NEW, "7", "*123#", new_dialog=True))
    assert screen.final
    refusals = [f for kind, f in h.events.events if kind == "refusal"]
    assert len(refusals) == 1 and refusals[0]["channel"] == "ussd"
    assert refusals[0]["msisdn"] == NEW and refusals[0]["reason"]
