"""The web chat page in a real headless browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from core_helpers import api_node_config, web_page

from exo_core.api.testing import BackgroundNode
from exo_core.engines.dummy import DUMMY_ANSWER
from exo_core.models.tokenizer import load_tokenizer

CHROMIUM = os.environ.get("EXO_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no chromium at {CHROMIUM}")


@pytest.fixture(scope="module")
def server():
    config = api_node_config(
        "web-test-node",
        engine_options={"dummy_delay_ms": 40},  # slow enough to watch the answer grow
    )
    with BackgroundNode(config) as node:
        yield node


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as pw, web_page(pw, CHROMIUM, CHROMIUM_ARGS, server.url) as page:
        yield page


def ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_chat_streams_an_answer(page, server):
    sync_api.expect(page.locator("#model option").first).to_have_attribute("value", "smollm2-135m")
    sync_api.expect(page.locator("#nodes")).to_contain_text("web-test-node")
    sync_api.expect(page.locator("#nodes")).to_contain_text("layers 0–29 of 30")

    page.fill("#temperature", "0")  # the dummy engine's answer, word for word
    ask(page, "Who are you?")
    answer = page.locator(".message.assistant").last
    sync_api.expect(answer).to_have_class("message assistant streaming")
    # Streaming: part of the answer is on screen before all of it is.
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('.message.assistant')].pop();"
        " return m && m.textContent.length > 0; }"
    )
    partial = answer.text_content()
    assert partial and len(partial) < len(DUMMY_ANSWER)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-chat-streaming.png"))
    sync_api.expect(answer).to_have_text(DUMMY_ANSWER, timeout=10_000)
    sync_api.expect(answer).not_to_have_class("message assistant streaming")
    sync_api.expect(page.locator("#stats")).to_contain_text("tokens/s")
    tokens = len(load_tokenizer(server.runtime.default_model).encode(DUMMY_ANSWER)) + 1  # + end of turn
    sync_api.expect(page.locator("#stats")).to_contain_text(f" {tokens} tokens ·")

    ask(page, "And again?")  # a second turn, sent with the first as history
    sync_api.expect(page.locator(".message.assistant")).to_have_count(2)
    sync_api.expect(page.locator(".message.assistant").last).to_have_text(DUMMY_ANSWER, timeout=10_000)
    assert page.locator(".message.user").all_text_contents() == ["Who are you?", "And again?"]
    page.screenshot(path=str(ARTIFACTS / "web-chat.png"))


def test_stop_button_stops_generation(page, server):
    engine = server.runtime.node.engine
    engine.delay_s = 0.3
    try:
        page.click("#new-chat")
        ask(page, "Tell me a long story")
        answer = page.locator(".message.assistant").last
        page.wait_for_function(
            "() => { const m = [...document.querySelectorAll('.message.assistant')].pop();"
            " return m && m.textContent.length > 0; }"
        )
        page.click("#stop")
        sync_api.expect(answer.locator(".note")).to_have_text("stopped")
        sync_api.expect(page.locator("#send")).to_be_visible()
        deadline = time.monotonic() + 1.0
        kept = server.runtime.node.stage.kept  # finished requests' caches, kept for prefix reuse

        def live() -> list[str]:
            return [k for k in engine.caches if k not in kept]

        while live() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not live(), "stopping in the page must free the node's caches"
        assert DUMMY_ANSWER not in (answer.text_content() or "")
    finally:
        engine.delay_s = 0.04
