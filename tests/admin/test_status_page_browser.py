"""The status page in headless Chromium: its script fetches the API with the token
from the URL fragment and fills in the figures, read back from the DOM.

Needs the Debian `chromium` package; without it the test skips and says so
(`make browser-test` installs it when run as root).
"""

from __future__ import annotations

import asyncio
import html
import re
import shutil

import pytest

from tests.admin.conftest import TOKEN

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_TIMEOUT_S = 60


async def dump_dom(url: str, profile_dir: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile_dir}", "--virtual-time-budget=10000",
        "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), BROWSER_TIMEOUT_S)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def text_of(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert m, f"no #{element_id} in the page"
    return html.unescape(m.group(1))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
async def test_status_page_shows_live_figures(played, tmp_path):
    env, admin, port = played
    stats = await admin.stats()
    dom = await dump_dom(f"http://127.0.0.1:{port}/status#token={TOKEN}", str(tmp_path))
    assert 'data-loaded="1"' in dom, text_of(dom, "message")
    assert text_of(dom, "node") == env.settings.node.name
    outstanding = stats["outstanding_minor"]
    assert text_of(dom, "outstanding") == f"{outstanding // 100}.{outstanding % 100:02d} EGP"
    assert text_of(dom, "recovery-rate") == f"{stats['recovery_rate'] * 100:.1f} %"
    for rate in ("loans-rate", "paybacks-rate", "ads-rate"):
        assert re.fullmatch(r"\d+\.\d\d", text_of(dom, rate))
    assert "BARRED_BAD_DEBT" in dom and "NOT_OPTED_IN" in dom
    assert dom.count('class="up">Open<') == stats["peers_open"]
    assert 'class="up">bound<' in dom
    assert TOKEN not in dom  # the fragment was taken out of the address bar


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
async def test_status_page_without_token_says_why(played, tmp_path):
    _, _, port = played
    dom = await dump_dom(f"http://127.0.0.1:{port}/status", str(tmp_path))
    assert 'data-loaded="error"' in dom
    assert "401" in text_of(dom, "message")
