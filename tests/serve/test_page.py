"""The chat page in headless Chromium at phone size: send a message, see the streamed reply.

Needs the Debian packages chromium and chromium-driver (skipped without them). Set
EDGELLM_SCREENSHOT=path.png to keep the screenshot (the README's comes from the real pair).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
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
