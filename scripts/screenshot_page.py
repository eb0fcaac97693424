"""Serve a bundle and photograph the chat page at phone size in headless Chromium: a code answer, and a race.

    .venv/bin/python scripts/screenshot_page.py BUNDLE [OUT_DIR] [--max-tokens N] [--window 1280x800]

Writes OUT_DIR/page-code.png (a rendered code answer, streamed with speculation) and
OUT_DIR/page-race.png (the same kind of question raced: target alone, then speculative) and
prints what each showed. OUT_DIR defaults to docs/. Needs chromium + chromium-driver (Debian)
and the serve and dev extras. This is how the README's screenshots were made.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from edgellm.server import prepare

CODE_QUESTION = ("Write a Python function that checks whether a string is a palindrome, ignoring case and "
                 "punctuation, and explain it in two sentences.")
RACE_QUESTION = "Write a Python function that returns the n-th Fibonacci number iteratively."


def phone(window: str = "390x844") -> webdriver.Chrome:
    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=" + window.replace("x", ","),
                "--force-device-scale-factor=2"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def ask(browser: webdriver.Chrome, question: str, button: str, done_css: str) -> None:
    browser.find_element(By.ID, "input").send_keys(question)
    browser.find_element(By.ID, button).click()
    WebDriverWait(browser, 900).until(lambda b: b.find_elements(By.CSS_SELECTOR, done_css)
                                      and b.find_element(By.ID, "send").text == "Send")


def main(bundle: str, out_dir: str, max_tokens: int, window: str = "390x844") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = prepare(bundle, port=port)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    browser = phone(window)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(browser, 30).until(lambda b: "·" in b.find_element(By.ID, "model").text)
        browser.execute_script("document.getElementById('max_tokens').value = arguments[0]", str(max_tokens))
        ask(browser, CODE_QUESTION, "send", ".assistant .meta")
        box = browser.find_element(By.CSS_SELECTOR, ".assistant .codebox")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
        browser.save_screenshot(str(out / "page-code.png"))
        print("code answer:", browser.find_element(By.CSS_SELECTOR, ".assistant .meta").text)
        browser.find_element(By.ID, "clear").click()
        ask(browser, RACE_QUESTION, "race", ".race .verdict.same, .race .verdict.differ")
        browser.execute_script("document.querySelector('.race').scrollIntoView({block: 'start'})")
        browser.save_screenshot(str(out / "page-race.png"))
        speeds = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".race .lane .speed")]
        print("race:", " vs ".join(speeds), "·", browser.find_element(By.CSS_SELECTOR, ".race .verdict").text)
    finally:
        browser.quit()
        server.should_exit = True


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("out_dir", nargs="?", default="docs")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--window", default="390x844", help="browser size, WIDTHxHEIGHT (a phone by default)")
    a = p.parse_args()
    main(a.bundle, a.out_dir, a.max_tokens, a.window)
