"""The web page renders answers as sanitised Markdown and shows this node's downloads
(headless chromium driven by Playwright, as tests/test_api_web.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from core_helpers import api_node_config, web_page

from exo_core.api.testing import BackgroundNode
from exo_core.models.cards import ModelCard
from exo_core.models.files import embedded_gguf_path, shard_checkpoint
from exo_core.models.shard import Shard
from exo_core.testing.hub import StandInHub

CHROMIUM = os.environ.get("EXO_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--no-first-run"]
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no chromium at {CHROMIUM}")

MARKDOWN = """Here is **bold** and `code`:

```python
print("<b>hi</b>")
```

- one
- two

| a | b |
|---|---|
| 1 | 2 |

<img src=x onerror="window.__pwned = 1">

<script>window.__pwned = 2</script>

[a link](javascript:window.__pwned=3) and [exo](https://example.org/)
"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    repo = tmp / "repo"
    repo.mkdir()
    os.symlink(embedded_gguf_path(), repo / "smol.gguf")
    saved = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "EXO_HOME")}
    with StandInHub() as hub:
        hub.add_repo("org/smol-web", repo)
        os.environ.update(HF_ENDPOINT=hub.url, EXO_HOME=str(tmp / "home"))
        try:
            # a real download in this process: the node's /v1/downloads reports it
            card = ModelCard("smol-web", "smol-web", 30, {"gguf": "org/smol-web:smol.gguf"})
            shard_checkpoint(card, Shard("smol-web", 0, 9, 30), ["gguf"])
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    config = api_node_config("web-markdown-node")
    with (
        BackgroundNode(config) as server,
        sync_api.sync_playwright() as pw,
        web_page(pw, CHROMIUM, CHROMIUM_ARGS, server.url) as page,
    ):
        yield page


def test_answers_render_as_sanitised_markdown(page):
    page.evaluate(
        "(text) => { const el = document.createElement('div'); el.id = 'probe';"
        " el.className = 'message assistant'; document.getElementById('messages').append(el);"
        " window.exoRenderAnswer(el, text); }",
        MARKDOWN,
    )
    probe = page.locator("#probe")
    sync_api.expect(probe.locator("strong")).to_have_text("bold")
    sync_api.expect(probe.locator("pre code")).to_contain_text('print("<b>hi</b>")')
    assert probe.locator("pre b").count() == 0  # code is shown, not interpreted
    assert probe.locator("li").count() == 2
    assert probe.locator("table td").all_text_contents() == ["1", "2"]
    assert probe.locator("script").count() == 0
    assert probe.locator("[onerror]").count() == 0
    assert probe.locator('a[href^="javascript"]').count() == 0
    sync_api.expect(probe.locator('a[href="https://example.org/"]')).to_have_attribute(
        "rel", "noopener noreferrer"
    )
    page.wait_for_timeout(200)  # an onerror handler would have run by now
    assert page.evaluate("window.__pwned") is None


def test_a_streamed_answer_is_markdown_too(page):
    page.fill("#temperature", "0")
    page.fill("#input", "Who are you?")
    page.press("#input", "Enter")
    answer = page.locator(".message.assistant:not(#probe)").last
    sync_api.expect(answer.locator("p")).to_contain_text("Hello from the exo dummy engine.", timeout=30_000)


def test_the_page_shows_this_nodes_downloads(page):
    box = page.locator("#downloads-box")
    sync_api.expect(box).to_be_visible(timeout=10_000)
    item = page.locator("#downloads li").first
    sync_api.expect(item).to_contain_text("smol.gguf · layers 0-9/30")
    sync_api.expect(item).to_contain_text("web-markdown-node ← hub")
    sync_api.expect(item).to_contain_text("done")
    width = item.locator(".progress span").evaluate("el => el.style.width")
    assert width == "100%"
