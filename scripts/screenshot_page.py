"""Serve a bundle, chat with it through the page in headless Chromium at phone size, save a PNG.

    .venv/bin/python scripts/screenshot_page.py BUNDLE docs/serve-phone.png "your question"

Needs chromium + chromium-driver (Debian) and the serve and dev extras. This is how the
README's screenshot was made.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from edgellm.server import prepare


def main(bundle: str, out: str, question: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = prepare(bundle, port=port)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=390,844",
                "--force-device-scale-factor=2"):
        opts.add_argument(arg)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(browser, 30).until(lambda b: "·" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "input").send_keys(question)
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 600).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant .meta"))
        browser.execute_script("document.getElementById('log').scrollTop = 0")
        browser.save_screenshot(out)
        print(browser.find_element(By.CSS_SELECTOR, ".assistant .meta").text)
    finally:
        browser.quit()
        server.should_exit = True


if __name__ == "__main__":
    main(*sys.argv[1:4])
