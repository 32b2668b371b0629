"""The chat page of `chat.py --serve` (GET /, extras/serve_page.html) in a real headless browser: Debian's chromium
driven by selenium, against test_serve.py's server of test_chat.py's tiny model.

The page must send what a client of the API sends: the picked picture as a data: URL in the first message, the
whole conversation on every turn, nothing of the old conversation after "New conversation". The references are
chat.py's greedy answer to the same picture and question, and a from-scratch greedy decode of the llama3_chat
history built by hand; the answer must show while it is being generated, not only at its end.
"""

import shutil
import threading

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

import chat
import clip
from test_chat import greedy_full_forward, run, user_turn  # noqa: F401 (run is a fixture)
from test_serve import N, P, QUESTION, calls, chat_py, server  # noqa: F401 (calls, server are fixtures)

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="the Debian packages chromium and chromium-driver "
                                "are not installed (.ci/run installs them with apt-get)")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(flag)  # no sandbox: CI runs as root
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))  # Debian's driver: nothing downloaded
    yield driver
    driver.quit()


def wait(driver, condition, what):
    return WebDriverWait(driver, 60).until(lambda d: condition(d), message=what)


def answers(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#log .assistant")


def finished(driver, n):
    """The text of the n-th answer once the page has finished it."""
    wait(driver, lambda d: len(answers(d)) >= n and answers(d)[n - 1].get_attribute("data-done"), f"answer {n}")
    return answers(driver)[n - 1].get_attribute("textContent")


def test_pick_a_picture_chat_and_start_over(run, server, browser, calls, monkeypatch):
    model_dir, image, tok = run
    (want,) = chat_py(model_dir, calls, "--image", str(image), "--prompt", QUESTION)
    (want_hi,) = chat_py(model_dir, calls, "--prompt", "hi")
    # the first answer pauses once it has text, until the page has shown that part: it streams in
    release, real = threading.Event(), chat.generate

    def pausing(model, prompts, pixel_values=None, on_token=None, **kw):
        got = []

        def on(row, t):
            on_token(row, t)
            got.append(t)
            if not release.is_set() and tok.decode(got).strip() and len(got) < N:
                release.wait(60)

        return real(model, prompts, pixel_values, on_token=on, **kw)

    monkeypatch.setattr(chat, "generate", pausing)
    browser.get(server[0] + "/")
    wait(browser, lambda d: d.find_element(By.ID, "title").text == "tiny", "the model's name")
    browser.find_element(By.ID, "image").send_keys(str(image))
    wait(browser, lambda d: (d.find_element(By.ID, "preview").get_attribute("src") or "").startswith(
        "data:image/png;base64,"), "the picked picture's preview")
    browser.find_element(By.ID, "message").send_keys(QUESTION)
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: answers(d) and answers(d)[0].get_attribute("textContent"), "the first part of answer 1")
    part = answers(browser)[0].get_attribute("textContent")
    assert answers(browser)[0].get_attribute("data-done") is None
    release.set()
    first = finished(browser, 1)
    assert part != first and first.startswith(part)
    monkeypatch.setattr(chat, "generate", real)
    assert first == tok.decode(want["answer"])  # chat.py's answer to the same picture and question

    # the conversation goes on (Enter sends): the whole history is sent again, the picture in its first message
    browser.find_element(By.ID, "message").send_keys("And what colour is it?" + Keys.ENTER)
    second = finished(browser, 2)
    eot = tok.special("<|eot_id|>")
    history = [tok.bos_id] + user_turn(tok, QUESTION, P) + tok.encode(first) + [eot] \
        + user_turn(tok, "And what colour is it?")
    assert len(calls) > 2 and calls[-1]["prompt"] == history
    pixels = clip.preprocess(clip.load_image(image), 64, pad_to_square=True)[None]
    stops = {eot, tok.special("<|end_of_text|>")}
    assert second == tok.decode(greedy_full_forward(server[1].model, history, pixels, N, stops))

    # an error is shown in place of the answer, and the conversation stays as it was
    browser.find_element(By.ID, "message").send_keys("word " * 300 + Keys.ENTER)
    assert "context" in finished(browser, 3)
    assert "error" in answers(browser)[2].get_attribute("class")

    # New conversation: an empty log, no picture, nothing of the old conversation sent
    browser.find_element(By.ID, "reset").click()
    assert answers(browser) == [] and not browser.find_element(By.ID, "preview").is_displayed()
    browser.find_element(By.ID, "message").send_keys("hi" + Keys.ENTER)
    assert finished(browser, 1) == tok.decode(want_hi["answer"])
    assert calls[-1]["prompt"] == want_hi["prompt"] == [tok.bos_id] + user_turn(tok, "hi")
