"""The chat page in headless Chromium at phone size: streamed replies rendered as markdown (safely),
a conversation kept across turns and reloads, and the race of target alone vs speculation.

Needs the Debian packages chromium and chromium-driver (skipped without them). Set
EDGELLM_SCREENSHOT=path.png to keep the screenshot (the README's comes from the real pair).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
import httpx  # noqa: E402
from live import llm, server  # noqa: E402,F401 - fixtures

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HAVE_BROWSER = os.path.exists(CHROMIUM) and os.path.exists(DRIVER)
# CI (.ci/run) installs the browser and sets EDGELLM_REQUIRE_BROWSER=1: there a missing one fails
pytestmark = pytest.mark.skipif(not HAVE_BROWSER and os.environ.get("EDGELLM_REQUIRE_BROWSER") != "1",
                                reason="needs chromium and chromedriver (apt install chromium chromium-driver)")


def phone_browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=390,844", "--force-device-scale-factor=2"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def test_page_streams_a_reply(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = phone_browser()
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 20).until(lambda b: "speculative" in b.find_element(By.ID, "model").text)
        browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
        temperature = browser.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("1")  # the tiny model's greedy chat answer is blank lines, which markdown drops
        # ... and a seed, so that the sampled answer is the same every run (not an early end of text)
        browser.execute_script("""
          const real = window.fetch.bind(window);
          window.fetch = (url, init) => {
            if (url === "/v1/chat/completions") init = { ...init, body: JSON.stringify({ ...JSON.parse(init.body), seed: 6 }) };
            return real(url, init);
          };""")
        browser.find_element(By.ID, "input").send_keys("def foo(x): return")
        browser.find_element(By.ID, "send").click()
        reply = WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.CSS_SELECTOR, ".assistant .meta") and b.find_element(By.CSS_SELECTOR, ".assistant"))
        text = reply.text
        assert "tokens" in text and "tok/s" in text
        assert browser.find_elements(By.CSS_SELECTOR, ".assistant span.d")  # drafted tokens highlighted
        assert browser.find_element(By.ID, "tps").text not in ("", "–")
        assert browser.find_element(By.ID, "send").text == "Send"  # done streaming
        shot = Path(os.environ.get("EDGELLM_SCREENSHOT") or tmp_path / "page.png")
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
    finally:
        browser.quit()


def wait(browser, predicate, seconds=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, seconds).until(predicate)


@pytest.fixture
def browser(server):
    from selenium.webdriver.common.by import By

    b = phone_browser()
    try:
        b.get(server.url + "/")
        wait(b, lambda b: "·" in b.find_element(By.ID, "model").text, 20)
        yield b
    finally:
        b.quit()


CODE = ('def foo(x):\n    # a <img src=x onerror="window.pwned=2"> comment\n'
        '    return "<b>" + str(x)  # done\n\n    print(1_000, 0x1f)')
ANSWER = ("Here is **the** fix for `foo` <script>window.pwned=1</script>:\n\n```python\n" + CODE +
          "\n```\n\n- one <img src=x onerror=\"window.pwned=3\">\n- two *em*\n")

# The page's fetch of /v1/chat/completions answered by a script: ANSWER in 3-character pieces,
# every other one drafted, in the server's chunk format (the rest goes to the server).
FAKE_STREAM = """
const pieces = arguments[0];
window.sent = [];
const real = window.fetch.bind(window);
window.fetch = async (url, init) => {
  if (url !== "/v1/chat/completions") return real(url, init);
  window.sent.push(JSON.parse(init.body));
  const enc = new TextEncoder();
  const chunk = (o) => enc.encode("data: " + JSON.stringify(o) + "\\n\\n");
  const stream = new ReadableStream({ async start(c) {
    for (const [text, drafted] of pieces) {
      c.enqueue(chunk({ choices: [{ index: 0, delta: { content: text } }], edgellm: { drafted: [drafted] } }));
      await new Promise((r) => setTimeout(r, 2));
    }
    c.enqueue(chunk({ choices: [{ index: 0, delta: {}, finish_reason: "stop" }],
                      edgellm: { mode: "speculative", tokens_per_second: 42.0, acceptance_rate: 0.5,
                                 mean_tokens_per_round: 2.0, generated_tokens: pieces.length,
                                 time_to_first_token_s: 0.1 } }));
    c.enqueue(enc.encode("data: [DONE]\\n\\n"));
    c.close();
  } });
  return new Response(stream, { status: 200, headers: { "Content-Type": "text/event-stream" } });
};
Object.defineProperty(navigator, "clipboard", { configurable: true,
  value: { writeText: async (t) => { window.copied = t; } } });
"""


def test_streamed_markdown_renders_code_and_never_html(browser):
    from selenium.webdriver.common.by import By

    pieces = [[ANSWER[i:i + 3], (i // 3) % 2 == 1] for i in range(0, len(ANSWER), 3)]
    browser.execute_script(FAKE_STREAM, pieces)
    browser.find_element(By.ID, "input").send_keys("fix foo")
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant .meta"))
    code = browser.find_element(By.CSS_SELECTOR, ".assistant pre code")
    assert browser.execute_script("return arguments[0].textContent", code) == CODE
    assert "language-python" in code.get_attribute("class")
    assert code.find_elements(By.CSS_SELECTOR, "span.d")  # the drafted highlight reaches into code
    kinds = browser.execute_script(
        "return [...arguments[0].querySelectorAll('.k,.s,.c,.n')].map(e => e.className + ':' + e.textContent)", code)
    assert {"k:def", "k:return", "s:\"<b>\"", "c:# done", "n:1_000", "n:0x1f"} <= set(kinds), kinds
    body = browser.find_element(By.CSS_SELECTOR, ".assistant .body")
    assert browser.execute_script("return arguments[0].querySelector('strong').textContent", body) == "the"
    assert browser.execute_script("return arguments[0].querySelector('p code').textContent", body) == "foo"
    assert [li.text for li in body.find_elements(By.TAG_NAME, "li")] == [
        'one <img src=x onerror="window.pwned=3">', "two em"]
    # injected HTML is text: no element made, no handler run
    assert "<script>window.pwned=1</script>" in body.text
    assert browser.execute_script("return document.querySelectorAll('#log img, #log script, #log b').length") == 0
    assert browser.execute_script("return window.pwned === undefined")
    # the copy button puts the code itself on the clipboard
    browser.find_element(By.CSS_SELECTOR, ".codebox button.copy").click()
    wait(browser, lambda b: b.execute_script("return window.copied") is not None, 5)
    assert browser.execute_script("return window.copied") == CODE
    assert browser.find_element(By.CSS_SELECTOR, ".codebox button.copy").text == "Copied"


def test_unfinished_fence_renders_as_code_while_it_streams(browser):
    render = "const d = document.createElement('div'); window.edgellmPage.renderMarkdown(d, arguments[0], " \
             "Array(arguments[0].length).fill(false)); return d.querySelector('pre code')?.textContent ?? null"
    assert browser.execute_script(render, "Try:\n```js\nlet x = 1;\n") == "let x = 1;\n"
    assert browser.execute_script(render, "Try:\n```js\nlet x = 1;\n```\nafter") == "let x = 1;"
    assert browser.execute_script(render, "no code") is None


def sent_bodies_recorder(browser):
    browser.execute_script("""
      window.sent = [];
      const real = window.fetch.bind(window);
      window.fetch = (url, init) => { if (url === "/v1/chat/completions") window.sent.push(JSON.parse(init.body));
                                      return real(url, init); };""")


def settle(browser, replies):
    from selenium.webdriver.common.by import By

    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant .meta")) >= replies
         and b.find_element(By.ID, "send").text == "Send")


def test_conversation_sends_every_turn_and_survives_a_reload(browser, server):
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    browser.find_element(By.ID, "max_tokens").send_keys("8")
    browser.find_element(By.ID, "system").send_keys("Answer in code.")
    browser.find_element(By.ID, "input").click()  # 'change' fires: the settings are kept
    sent_bodies_recorder(browser)
    for i, text in enumerate(["first question", "second question"]):
        browser.find_element(By.ID, "input").send_keys(text)
        browser.find_element(By.ID, "send").click()
        settle(browser, i + 1)
    first, second = browser.execute_script("return window.sent")
    system = {"role": "system", "content": "Answer in code."}
    assert first["messages"] == [system, {"role": "user", "content": "first question"}]
    # what the page kept as the first answer is what the server answers to the first turn
    alone = httpx.post(server.url + "/v1/chat/completions",
                       json={"messages": first["messages"], "max_tokens": 8, "temperature": 0}).json()
    answer = alone["choices"][0]["message"]["content"]
    assert second["messages"] == [system, {"role": "user", "content": "first question"},
                                  {"role": "assistant", "content": answer},
                                  {"role": "user", "content": "second question"}]
    assert second["max_tokens"] == 8 and second["temperature"] == 0
    browser.refresh()
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2, 10)
    assert browser.find_element(By.ID, "system").get_attribute("value") == "Answer in code."
    browser.find_element(By.ID, "clear").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
    assert browser.execute_script("return JSON.parse(localStorage.getItem('edgellm-chat'))") == []


def test_race_shows_both_speeds_and_identical_output(browser):
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    browser.find_element(By.ID, "max_tokens").send_keys("16")
    sent_bodies_recorder(browser)
    browser.find_element(By.ID, "input").send_keys("def fib(n):")
    browser.find_element(By.ID, "race").click()
    verdict = wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, ".race .verdict").text
                   and b.find_element(By.CSS_SELECTOR, ".race .verdict"))
    assert "identical output" in verdict.text and "× the target's speed" in verdict.text
    speeds = [s.text for s in browser.find_elements(By.CSS_SELECTOR, ".race .lane .speed")]
    assert len(speeds) == 2 and all(re.fullmatch(r"\d+\.\d tok/s", s) for s in speeds), speeds
    bodies = browser.execute_script("return window.sent")
    assert [b["edgellm"]["mode"] for b in bodies] == ["target", "speculative"]
    assert all(b["temperature"] == 0 and b["messages"] == bodies[0]["messages"] for b in bodies)
    texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".race .lane .body")]
    assert texts[0] == texts[1]  # (the tiny model's greedy answer is blank lines: "identical" compares the raw text)
    assert json.loads(browser.execute_script("return localStorage.getItem('edgellm-chat')"))[-1]["role"] == "assistant"
