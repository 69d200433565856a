"""The browser chat page, driven by headless Chromium: a message gets a streamed answer with its figures."""

from __future__ import annotations

import json
import re

from playwright.sync_api import Route, expect, sync_playwright

from .conftest import API_KEY, ARTIFACTS, Server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ANSWER_TIMEOUT_MS = 90_000


def test_chat_page_streams_an_answer(server: Server, model_name: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.base_url + "/")
            expect(page.locator("#model-name")).to_have_text("needs an API key")
            page.fill("#api-key", API_KEY)
            page.dispatch_event("#api-key", "change")
            expect(page.locator("#model-name")).to_have_text(model_name)

            page.fill("#max-tokens", "24")
            page.fill("#prompt", "Write one sentence about the sea.")
            page.keyboard.press("Enter")
            expect(page.locator(".message.user .bubble")).to_have_text("Write one sentence about the sea.")
            answer = page.locator(".message.assistant").last
            expect(page.locator("#stop")).to_be_visible()
            expect(answer.locator(".bubble")).not_to_be_empty(timeout=ANSWER_TIMEOUT_MS)
            expect(answer).not_to_have_class(re.compile("streaming"), timeout=ANSWER_TIMEOUT_MS)
            expect(answer.locator(".stats")).to_have_text(re.compile(r"TTFT \d+\.\d\d s · .*tokens? · (stop|length)"))
            expect(page.locator("#send")).to_be_visible()

            page.fill("#prompt", "And one more about the sky.")
            page.click("#send")
            second = page.locator(".message.assistant").nth(1)
            expect(second.locator(".bubble")).not_to_be_empty(timeout=ANSWER_TIMEOUT_MS)
            expect(second).not_to_have_class(re.compile("streaming"), timeout=ANSWER_TIMEOUT_MS)

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()


def never_stop_early(route: Route) -> None:
    """Add ignore_eos to the page's request, so the answer is still streaming when Stop is pressed."""
    body = json.loads(route.request.post_data or "{}")
    route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))


def test_stop_button_ends_the_answer(server: Server) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.add_init_script(f"localStorage.setItem('pagedllm.apiKey', '{API_KEY}')")
            page.route("**/v1/chat/completions", never_stop_early)
            page.goto(server.base_url + "/")
            page.fill("#max-tokens", "2000")
            page.fill("#prompt", "Tell me a very long story about a dragon.")
            page.keyboard.press("Enter")
            answer = page.locator(".message.assistant").last
            expect(answer.locator(".bubble")).not_to_be_empty(timeout=ANSWER_TIMEOUT_MS)
            page.click("#stop")
            expect(answer.locator(".stats")).to_contain_text("stopped")
            expect(page.locator("#send")).to_be_visible()
            server.wait_until_idle()  # closing the stream aborted the request on the server
        finally:
            browser.close()
