"""The page at ``GET /`` in real headless Chromium (Debian's), driven by Playwright, against a
real ``rillet serve`` with the bundled model.

A reply is observed growing while the engine is frozen between observations (SIGSTOP on the
engine process), so the test never races the model: a frozen reply can neither grow nor
end. Screenshots go to ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from polling import poll_until_sync
from server_process import ServerHandle, frozen_engine, metric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
#: Greedy, so each reply's length is the same on every run: long enough to stop mid-way.
PAGE_QUERY = "?temperature=0&max_tokens=300"
STORY = "Tell me a long story about a lighthouse keeper and a storm."
# Chromium's own background traffic off (this machine has no internet; keep it quiet).
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
]


@pytest_asyncio.fixture(loop_scope="function")  # the test's own loop, as Playwright's
async def page(server: ServerHandle) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: scripts/setup.sh --test installs Debian's chromium")
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 820})
        visited: list[str] = []  # every URL the page asked for, WebSockets included
        page.on("request", lambda request: visited.append(request.url))
        page.on("websocket", lambda ws: visited.append(ws.url))
        await page.goto(server.url + "/" + PAGE_QUERY)
        yield page
        await browser.close()
    local = ("http://127.0.0.1:", "ws://127.0.0.1:")
    assert visited and all(url.startswith(local) for url in visited), visited


async def text_of(page: Any, element: str) -> str:
    return str(await page.text_content(element) or "")


async def grows_past(page: Any, element: str, length: int) -> None:
    await page.wait_for_function(
        f"document.getElementById({element!r}).textContent.length > {length}", timeout=60_000
    )


async def test_chat_streams_into_output_and_stop_cancels(page: Any, server: ServerHandle) -> None:
    await page.fill("#prompt", STORY)
    await page.click("#send")
    observed: list[str] = []
    for _ in range(3):
        # Each observation waits for a few more words (60 characters) than the last one.
        await grows_past(page, "output", len(observed[-1]) + 60 if observed else 0)
        with frozen_engine(server):
            # Frozen, the reply can neither grow nor end: this is a moment mid-stream.
            observed.append(await text_of(page, "#output"))
            assert await page.is_enabled("#stop") and not await page.is_enabled("#send")
            if len(observed) == 3:
                await page.screenshot(path=ARTIFACTS / "page-chat-streaming.png")
    assert all(a and b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(observed))
    await page.wait_for_function("!document.getElementById('send').disabled", timeout=120_000)
    assert (await text_of(page, "#stats")).startswith("finished")
    full_reply = await text_of(page, "#output")
    assert full_reply.startswith(observed[-1]) and len(full_reply) > len(observed[-1])

    # Stop, mid-reply: the engine is frozen when Stop is pressed, so the reply is still
    # running when the cancel frame arrives.
    await page.fill("#prompt", "Now tell it again, with more detail.")
    await page.click("#send")
    await grows_past(page, "output", 0)
    with frozen_engine(server):
        await page.click("#stop")
    await page.wait_for_function(
        "document.getElementById('stats').textContent.startsWith('stopped')", timeout=60_000
    )
    poll_until_sync(lambda: metric(server, "rillet_requests_running") == 0)
    assert metric(server, "rillet_requests_in_flight") == 0


async def test_streamed_shows_text_before_buffered(page: Any, server: ServerHandle) -> None:
    await page.fill("#prompt", STORY)
    await page.click("#compare")
    await grows_past(page, "streamed", 100)
    with frozen_engine(server):
        # The streamed side has text; the buffered one can only show its answer once every
        # token exists, and the engine is frozen mid-answer.
        assert await text_of(page, "#streamed")
        assert await text_of(page, "#buffered") == ""
        await page.screenshot(path=ARTIFACTS / "page-streaming-vs-not.png")
    await grows_past(page, "buffered", 0)
    await page.wait_for_function("!document.getElementById('compare').disabled", timeout=120_000)
    streamed, buffered = await text_of(page, "#streamed"), await text_of(page, "#buffered")
    assert streamed == buffered and len(streamed) > 50  # greedy: the same answer both ways


async def test_a_sampled_comparison_shows_the_same_text_on_both_sides(page: Any) -> None:
    """The demo sends one seed to both sides, so sampling draws the same tokens for each."""
    await page.click("details.settings summary")  # the settings are folded away
    await page.fill("#temperature", "1.0")
    await page.fill("#max-tokens", "48")
    await page.fill("#prompt", STORY)
    await page.click("#compare")
    await page.wait_for_function("!document.getElementById('compare').disabled", timeout=120_000)
    streamed, buffered = await text_of(page, "#streamed"), await text_of(page, "#buffered")
    assert streamed == buffered and len(streamed) > 20


async def test_a_phone_width_screen_shows_every_control(page: Any) -> None:
    await page.set_viewport_size({"width": 390, "height": 844})
    for element in ("#prompt", "#send", "#stop", "#compare"):
        box = await page.locator(element).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, element
    await page.screenshot(path=ARTIFACTS / "page-phone.png", full_page=True)
