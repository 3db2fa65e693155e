"""The web demo of `python -m easygen.serve`, driven by headless Chromium through selenium (Debian's
`chromium` and `chromium-driver`): attach a picture and ask about it (the answer streams in), ask for a
picture (BiDiffuser's drawing appears in the conversation), draw with the Draw button, and attach a file
that is not a picture (an error, and the page goes on); with an API key, the login asked once per browser
session, and the busy message when the engine's line is full. The tiny LLM is trained first (tests/test_serve_api.py)
so that its answers are the learned words; the drawn pictures are compared pixel for pixel with
BiDiffuser's text-to-image in this process.

Screenshots go to the test's tmp folder. The README's pictures (experiments/screenshots/) are taken with the
recipe's trained model by experiments/screenshots.py, not with this test's model."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.test_serve_api import (
    CAPTION,
    DESCRIBE,
    DRAW,
    SEED,
    SQUARE,
    Server,
    server_args,
    server_env,
    train_tiny,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "headless Chromium is not installed: apt-get install -y chromium chromium-driver", allow_module_level=True
    )


pytestmark = pytest.mark.usefixtures("one_thread")

# the text of the last text message of the assistant, and every state it went through (a MutationObserver)
WATCH = """
window.__seen = [];
const root = document.querySelector('#easygen-chat');
const last = () => {
  const bots = [...root.querySelectorAll('[data-testid=bot]')].filter(b => !b.querySelector('img'));
  return bots.length ? bots[bots.length - 1].textContent : null;
};
window.__last = last;
new MutationObserver(() => {
  const t = last();
  if (t !== null && window.__seen[window.__seen.length - 1] !== t) window.__seen.push(t);
}).observe(root, {subtree: true, childList: true, characterData: true});
"""
BOT_IMAGES = """
return [...document.querySelectorAll('#easygen-chat [data-testid=bot] img')]
  .filter(i => i.complete && i.naturalWidth > 0).map(i => [i.src, i.naturalWidth, i.naturalHeight]);
"""


def _norm(text: str | None) -> str:
    return " ".join((text or "").split())


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chromium")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,1000", f"--user-data-dir={tmp / 'profile'}",
                # nothing but this machine: a page that fetched from the network would show it
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager: no driver downloads
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("serve-web")
    trained = train_tiny(tmp)
    (tmp / "cwd").mkdir()
    srv = Server(server_args(tmp, [f"init_from={trained['weights']}"]), cwd=tmp / "cwd", env=server_env(tmp))
    yield srv, trained, tmp
    assert srv.stop() == 0, srv.output[-5000:]


def _shot(driver, tmp: Path, name: str, readme: bool = True) -> Path:
    path = tmp / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _wait(driver, condition, timeout=60, what=""):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}") from None


def _send(driver, text: str, file: Path | None = None) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "#easygen-message")
    if file is not None:
        box.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(file))
        _wait(driver, lambda d: not box.find_elements(By.CSS_SELECTOR, ".uploading, [aria-busy=true]")
              and box.find_elements(By.CSS_SELECTOR, ".thumbnail-item, .thumbnail-image, img"),
              what=f"the upload of {file.name}")
    area = box.find_element(By.CSS_SELECTOR, "textarea")
    area.clear()
    if text:
        area.send_keys(text)
    box.find_element(By.CSS_SELECTOR, "button.submit-button").click()


def _picture_at(url: str) -> np.ndarray:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, url
    with Image.open(io.BytesIO(r.content)) as img:
        return np.asarray(img.convert("RGB"))


def test_web_demo(served, browser, tmp_path):
    srv, trained, tmp = served
    d = browser
    d.get(srv.url + "/")
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#easygen-message textarea"), what="the page")
    d.execute_script(WATCH)

    # a picture and a question: the answer streams in and is the learned caption
    _send(d, DESCRIBE, trained["picture"])
    _wait(d, lambda d: _norm(d.execute_script("return window.__last()")) == CAPTION, what="the streamed answer")
    seen = [_norm(s) for s in d.execute_script("return window.__seen")]
    growing = [s for s in seen if s and s != CAPTION]
    assert growing and all(CAPTION.startswith(s) for s in growing), seen  # parts of it came first
    # Regenerate answers the last question again (the same words at temperature 0)
    d.execute_script("window.__seen = []")
    d.find_element(By.CSS_SELECTOR, "#easygen-regenerate").click()
    _wait(d, lambda d: any(_norm(s) != CAPTION for s in d.execute_script("return window.__seen"))
          and _norm(d.execute_script("return window.__last()")) == CAPTION, what="the regenerated answer")
    texts = d.find_elements(By.CSS_SELECTOR, "#easygen-chat [data-testid=bot]")
    assert len(texts) == 1, "regenerate replaced the answer"
    # the picture in context is shown beside the chat
    assert d.find_elements(By.CSS_SELECTOR, "#easygen-picture img")
    _shot(d, tmp_path, "web_chat")

    # the picture stays in context: asking for a drawing of it shows BiDiffuser's picture in the chat
    _send(d, DRAW)
    pics = _wait(d, lambda d: d.execute_script(BOT_IMAGES), what="the drawn picture")
    assert _norm(d.execute_script("return window.__last()")) == f"Here it is: <Img>{CAPTION}</Img>"
    (src, width, height), = pics
    assert (width, height) == (64, 64)
    np.testing.assert_array_equal(_picture_at(src), np.asarray(trained["reference"][(CAPTION, SEED)]))
    time.sleep(0.5)  # the scroll to the new message
    _shot(d, tmp_path, "web_draw")

    # the Draw button draws the typed description directly (the image seed setting: 1234)
    box = d.find_element(By.CSS_SELECTOR, "#easygen-message textarea")
    box.send_keys(SQUARE)
    d.find_element(By.CSS_SELECTOR, "#easygen-draw").click()
    pics = _wait(d, lambda d: (p := d.execute_script(BOT_IMAGES)) and len(p) == 2 and p, what="the Draw picture")
    np.testing.assert_array_equal(_picture_at(pics[1][0]), np.asarray(trained["reference"][(SQUARE, SEED)]))
    _shot(d, tmp_path, "web_draw_button", readme=False)

    # a file that is not a picture: a clear error, and the page goes on
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a picture")
    _send(d, DESCRIBE, notes)
    toast = _wait(d, lambda d: [t for t in d.find_elements(By.CSS_SELECTOR, ".toast-body") if t.is_displayed()],
                  what="the error message")
    assert "notes.txt is not a picture PIL can read" in toast[0].text, toast[0].text
    _shot(d, tmp_path, "web_error")
    assert srv.proc.poll() is None and srv.health()["status"] == "ok"

    # the page loaded nothing from anywhere but this server (fonts, scripts, pictures)
    resources = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and [r for r in resources if not r.startswith((srv.url, "data:", "blob:"))] == []

    # Clear forgets the conversation: the chat is empty again
    d.find_element(By.CSS_SELECTOR, "#easygen-clear").click()
    _wait(d, lambda d: not d.find_elements(By.CSS_SELECTOR, "#easygen-chat [data-testid=bot]"), what="the cleared chat")


KEY = "web-key-0123456789"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, one_thread):
    """Random weights, an API key, one answer at a time and one waiting, and slow drawings (so that a
    drawing holds the engine while the line fills)."""
    tmp = tmp_path_factory.mktemp("serve-web-key")
    (tmp / "cwd").mkdir()
    srv = Server(server_args(tmp, [f"stage.api_key={KEY}", "stage.max_batch=1", "stage.max_queue=1",
                                   "model.bidiffuser.sampler.steps=400"]), cwd=tmp / "cwd", env=server_env(tmp))
    yield srv
    assert srv.stop() == 0, srv.output[-5000:]


def _login(d, key: str) -> None:
    password = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=password]"), what="the login form")
    (user,) = [i for i in d.find_elements(By.CSS_SELECTOR, "input") if i.get_attribute("type") == "text"]
    user.clear()
    user.send_keys("me")
    password[0].clear()
    password[0].send_keys(key)
    (button,) = [b for b in d.find_elements(By.CSS_SELECTOR, "button") if b.text.strip().lower() == "login"]
    button.click()


def test_web_demo_asks_for_the_key_once_and_says_busy(guarded, browser, tmp_path):
    srv, d = guarded, browser
    d.get(srv.url + "/")
    assert "API key" in _wait(d, lambda d: d.find_element(By.TAG_NAME, "body").text, what="the login page")
    _login(d, "not-the-key")
    _wait(d, lambda d: "incorrect" in d.find_element(By.TAG_NAME, "body").text.lower(), what="the refusal")
    assert not d.find_elements(By.CSS_SELECTOR, "#easygen-message")
    _login(d, KEY)
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#easygen-message textarea"), what="the demo")
    _shot(d, tmp_path, "web_after_login", readme=False)
    # a new page in the same browser session: no second question
    d.get(srv.url + "/")
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#easygen-message textarea"), what="the demo again")
    assert not d.find_elements(By.CSS_SELECTOR, "input[type=password]")
    d.execute_script(WATCH)
    _send(d, "hello")
    _wait(d, lambda d: _norm(d.execute_script("return window.__last()")), what="an answer")
    _wait(d, lambda d: srv.health()["pending"] == 0, what="the answer's end")  # the demo's event is over

    # the line full (a drawing holds the engine, a chat waits): the demo says the server is busy
    from concurrent.futures import ThreadPoolExecutor

    auth = {"Authorization": f"Bearer {KEY}"}
    pool = ThreadPoolExecutor(2)
    drawing = pool.submit(httpx.post, srv.url + "/v1/images/generations", headers=auth, timeout=300,
                          json={"prompt": "a red circle", "n": 3})
    _wait(d, lambda d: (h := srv.health())["pending"] == 1 and h["waiting"] == 0, what="the drawing")
    waiting = pool.submit(httpx.post, srv.url + "/v1/chat/completions", headers=auth, timeout=300,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    _wait(d, lambda d: srv.health()["waiting"] >= 1, what="a waiting chat")
    _send(d, "are you there?")
    toast = _wait(d, lambda d: [t for t in d.find_elements(By.CSS_SELECTOR, ".toast-wrap, .toast-body")
                                if t.is_displayed() and "busy" in t.text.lower()], what="the busy message")
    assert "stage.max_queue=1" in toast[0].text, toast[0].text
    _shot(d, tmp_path, "web_busy", readme=False)
    assert not drawing.done(), "the drawing ended before the check: raise its sampler steps"
    assert drawing.result().status_code == 200 and waiting.result().status_code == 200
    # the question stays in the box to send again
    assert d.find_element(By.CSS_SELECTOR, "#easygen-message textarea").get_attribute("value") == "are you there?"
