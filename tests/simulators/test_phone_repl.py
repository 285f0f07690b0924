"""The terminal handset's loop, driven with scripted input against the in-process SMSC."""

from __future__ import annotations

import io

import pytest

from simulators import handset as handset_module
from simulators.handset import Handset, _LocalLink, phone_repl
from simulators.smsc import SmscSimulator
from tests.simulators.fake_esme import InProcessServer, MenuApp


async def test_repl_dials_answers_and_shows_sms(monkeypatch: pytest.MonkeyPatch) -> None:
    smsc = SmscSimulator()
    smsc._server = InProcessServer(smsc, MenuApp())
    lines = iter(["help", "1", "*123#", "1", "1", "sms LOAN", "cancel", "quit"])
    prompts: list[str] = []

    async def scripted(prompt: str) -> str | None:
        prompts.append(prompt)
        if prompt.startswith("201") and prompts.count(prompt) > 3:
            # let the SMS printer run before the next line
            import asyncio

            await asyncio.sleep(0.05)
        return next(lines, None)

    monkeypatch.setattr(handset_module, "_read_line", scripted)
    out = io.StringIO()
    await phone_repl(_LocalLink(Handset(smsc, "201000000001")), "201000000001", out=out)
    text = out.getvalue()
    assert "Dial a USSD code first" in text
    assert "Borrow 1.00 EGP?" in text and "Done: 1.00 EGP added." in text
    assert "(sent)" in text and "(dialog closed)" in text
    assert prompts[3] == "ussd> " and prompts[5].startswith("201")
