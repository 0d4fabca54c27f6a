"""The chat page at / in a real headless browser (Debian's chromium driven by Selenium through chromedriver):
it types a message and sees the streamed reply appear, and asks for the API key when the server has one.
Skipped, with the reason, where selenium or chromium is missing (.ci/run installs both)."""

from __future__ import annotations

import shutil
import time

import pytest
from conftest import tiny_checkpoint

TEXTS = ["Instruct: say hello\nOutput: hello there, friend.", "the cat sat on the mat."] * 10


def _browser_paths() -> tuple[str, str]:
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900"):
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    b.set_page_load_timeout(60)
    yield b
    b.quit()


class Slow:
    """Each decode step takes `delay` seconds, so a reply streams visibly for the page to be watched."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def step(self, *a, **kw):
        time.sleep(self.delay)
        return self.inner.step(*a, **kw)

    def greedy_step(self, *a, **kw):
        time.sleep(self.delay)
        return self.inner.greedy_step(*a, **kw)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from phiforge.serve.load import load_engine

    engine = load_engine(str(tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TEXTS, 300, 256)))
    engine.decoder = Slow(engine.decoder, 0.05)
    engine.step = engine.decoder.step
    return engine


def wait_for(predicate, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def set_value(browser, element_id: str, value: str) -> None:
    browser.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                           "e.dispatchEvent(new Event('input'));", element_id, value)


def test_page_streams_a_reply(browser, engine):
    from selenium.webdriver.common.by import By

    from phiforge.serve.server import BackgroundServer, Server

    server = Server(engine, "tiny")
    with BackgroundServer(server.app) as bg:
        browser.get(bg.url[:-3] + "/")
        wait_for(lambda: browser.find_element(By.ID, "model").text == "tiny", what="the model name")
        assert not browser.find_element(By.ID, "key-box").is_displayed()  # no key needed
        set_value(browser, "temperature", "0")
        set_value(browser, "max-tokens", "40")
        set_value(browser, "system", "Be brief.")
        browser.find_element(By.ID, "message").send_keys("say hello")
        browser.find_element(By.ID, "send").click()

        def reply():
            found = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            return found[-1] if found else None

        # The reply appears piece by piece: some text is shown before the stream has ended.
        partial = []

        def progressing() -> bool:
            r = reply()
            if r is None:
                return False
            if r.get_attribute("data-done"):
                return True
            if r.text:
                partial.append(r.text)
            return False

        wait_for(progressing, timeout=60, what="the reply to finish")
        final = reply().text
        assert partial and len(partial[0]) < len(final), (partial[:3], final)
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert server.streams_served == 1
        # The same request without streaming answers the same text (greedy), system prompt included.
        import openai

        client = openai.OpenAI(base_url=bg.url, api_key="x", max_retries=0)
        ref = client.chat.completions.create(model="tiny", temperature=0, max_tokens=40, top_p=0.95, messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "say hello"}])
        assert final == ref.choices[0].message.content
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "say hello"
        assert "tokens" in browser.find_element(By.ID, "status").text  # the usage chunk arrived
    server.close()


def test_page_asks_for_the_api_key(browser, engine):
    from selenium.webdriver.common.by import By

    from phiforge.serve.server import BackgroundServer, Server

    server = Server(engine, "tiny", api_key="s3cret")
    with BackgroundServer(server.app) as bg:
        browser.get(bg.url[:-3] + "/")
        browser.execute_script("sessionStorage.clear()")
        browser.refresh()
        box = browser.find_element(By.ID, "key-box")
        wait_for(box.is_displayed, what="the key box")
        browser.find_element(By.ID, "api-key").send_keys("s3cret")
        browser.find_element(By.ID, "key-save").click()
        wait_for(lambda: browser.find_element(By.ID, "model").text == "tiny", what="the model name")
        assert box.is_displayed()  # still there: the key can be changed
        set_value(browser, "max-tokens", "3")
        browser.find_element(By.ID, "message").send_keys("hi")
        browser.find_element(By.ID, "send").click()
        wait_for(lambda: any(e.get_attribute("data-done") for e in browser.find_elements(By.CSS_SELECTOR,
                                                                                          ".msg.assistant")),
                 timeout=60, what="the reply")
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    server.close()
