"""The /ui page in headless Chromium (Debian's `chromium`, driven by Playwright), against a live
two-worker server: type a message, click, see every expert's score as a bar and the decision."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.ops.conftest import OpsServer

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (containers, root), no GPU, and no traffic of the browser's own to anywhere.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EXPERTS = 7


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "headless Chromium is missing: run ./setup.sh --dev as root (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class WatchedPage:
    """A page that records every URL it asks for and every script error or CSP violation."""

    def __init__(self, browser: Browser) -> None:
        self.page: Page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.urls: list[str] = []
        self.problems: list[str] = []
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.on("console", lambda m: self.problems.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))


def bar_fractions(page: Page) -> dict[str, float]:
    return page.eval_on_selector_all("#scores .bar-row", """rows => Object.fromEntries(rows.map(r => [
        r.dataset.label,
        r.querySelector('.bar-fill').getBoundingClientRect().width
            / r.querySelector('.bar-track').getBoundingClientRect().width]))""")


def route(page: Page, text: str) -> None:
    page.fill("#message", text)
    page.click("#route-button")


def test_typing_a_message_shows_the_scores_as_bars_and_the_decision(
        ops_server: OpsServer, browser: Browser, tmp_path: Path) -> None:
    url = ops_server.url
    watched = WatchedPage(browser)
    page = watched.page
    page.goto(url + "/ui")
    experts = page.locator("#experts .expert")
    expect(experts).to_have_count(EXPERTS)
    expect(page.locator('#experts .expert[data-label="coder"] .chip')).to_have_text(["python", "code", "function"])
    expect(page.locator('#experts .expert[data-label="coder"] .description')).to_have_text("coder expert")

    text = "please write a python function that sorts a list"
    route(page, text)
    expect(page.locator("#scores .bar-row")).to_have_count(EXPERTS)
    expect(page.locator("#decision")).to_contain_text("coder")
    expect(page.locator("#decision")).to_contain_text("keyword")
    expect(page.locator("#scores .bar-row.winner")).to_have_attribute("data-label", "coder")
    # The bars grow to their score (a CSS transition): the winner's to the score /v1/route gives.
    body = {"model": "lemoe", "messages": [{"role": "user", "content": text}]}
    scores = requests.post(url + "/v1/route", json=body, timeout=10).json()["scores"]
    page.wait_for_function("""() => { const r = document.querySelector('#scores .bar-row.winner');
        return r.querySelector('.bar-fill').getBoundingClientRect().width > 0
            && r.getAnimations({subtree: true}).length === 0; }""")
    fractions = bar_fractions(page)
    assert fractions["coder"] == pytest.approx(scores["coder"], abs=0.02)
    assert fractions["writer"] == pytest.approx(0, abs=0.01)
    page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
    assert (tmp_path / "ui.png").stat().st_size > 10_000

    route(page, "hello, how are you today?")
    expect(page.locator("#decision")).to_contain_text("fallback")
    expect(page.locator("#scores .bar-row.winner")).to_have_attribute("data-label", "fallback")

    assert all(u.startswith(url + "/") for u in watched.urls), watched.urls  # nothing from elsewhere
    assert watched.problems == []  # no script error, no Content-Security-Policy violation


def test_the_routing_counts_follow_real_chat_requests_on_every_worker(
        ops_server: OpsServer, browser: Browser) -> None:
    url = ops_server.url
    page = WatchedPage(browser).page
    page.goto(url + "/ui")
    count = page.locator('#experts .expert[data-label="writer"] .count')
    expect(count).to_have_text(re.compile(r"^\d+$"))
    before = int(count.inner_text())
    total_before = int(page.inner_text("#total").split()[1])
    chat = {"model": "lemoe", "messages": [{"role": "user", "content": "a poem about rain"}], "stream": False}
    for _ in range(4):  # new connections: both workers answer some
        requests.post(url + "/api/chat", json=chat, headers={"Connection": "close"}, timeout=30)
    # Dry runs from the page itself are not counted.
    route(page, "a poem about rain")
    expect(page.locator("#decision")).to_contain_text("writer")
    page.evaluate("refresh()")
    expect(count).to_have_text(str(before + 4))
    expect(page.locator("#total")).to_contain_text(f"{total_before + 4} routed")
