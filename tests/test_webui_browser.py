"""`sftkit web-ui` in a real browser: Debian's chromium, driven by selenium through the system chromedriver.

One journey, as a user takes it: a typed path that does not exist is reported in the page; the Train form
trains a tiny model (the page reloaded mid-run re-attaches to the job), the loss plot draws and the best
checkpoint is listed and merged; Chat streams an answer from it; Evaluate shows the metrics table and the
examples; Data highlights the trained tokens and draws the length histogram. Each tab is photographed;
SFTKIT_SCREENSHOTS=docs writes the pictures the README shows.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
           "apt-get install chromium chromium-driver",
)
# Everything but the page's own address resolves nowhere, so the browser cannot reach Google's (or any) hosts.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"query": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}." + " Counting on fingers." * (a * b)}
            for a in range(4) for b in range(4)]  # answers of several lengths, for the histogram
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def web_ui(tmp_path_factory):
    """`sftkit web-ui` on a free loopback port, stopped (as Ctrl-C does) after the test."""
    root = tmp_path_factory.mktemp("webui")
    port = _free_port()
    env = {**os.environ, "SFTKIT_CACHE": str(root / "cache"), "GRADIO_TEMP_DIR": str(root / "gradio"),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    log = open(root / "web-ui.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "sftkit_cli.main", "web-ui", "--port", str(port),
                                "--output_dir", str(root / "output")], stdout=log, stderr=subprocess.STDOUT, env=env,
                               cwd=root)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"web-ui did not start:\n{(root / 'web-ui.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"url": url, "output": root / "output", "log": root / "web-ui.log"}
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


class Page:
    """The few gestures the journey needs, each addressing a field by its elem_id (<tab>-<option name>)."""

    def __init__(self, driver, shots):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        self.driver, self.shots, self.By, self.Keys = driver, shots, By, Keys

    def find(self, css: str):
        return self.driver.find_element(self.By.CSS_SELECTOR, css)

    def all(self, css: str):
        return self.driver.find_elements(self.By.CSS_SELECTOR, css)

    def text(self, elem_id: str) -> str:
        return self.find(f"#{elem_id}").text

    def value(self, elem_id: str) -> str:
        return self.find(f"#{elem_id} input, #{elem_id} textarea").get_attribute("value")

    def fill(self, elem_id: str, value) -> None:
        field = self.wait(lambda: self.find(f"#{elem_id} input, #{elem_id} textarea"), 10, f"the field {elem_id}")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
        field.send_keys(self.Keys.CONTROL, "a")
        field.send_keys(self.Keys.DELETE)
        field.send_keys(str(value))
        field.send_keys(self.Keys.TAB)

    def click(self, elem_id: str) -> None:
        button = self.wait(lambda: self.find(f"#{elem_id}"), 10, f"the element {elem_id}")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
        button.click()

    def open_group(self, elem_id: str) -> None:
        if not self.find(f"#{elem_id} [data-testid='accordion-content']").is_displayed():
            self.find(f"#{elem_id} button.label-wrap").click()

    def tab(self, name: str) -> None:
        self.click(f"tab-{name}-button")

    def wait(self, condition, timeout: float, what: str, interval: float = 0.2):
        """condition()'s first true value; an element not rendered yet (or re-rendered) counts as not yet."""
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                result = condition()
            except (NoSuchElementException, StaleElementReferenceException):
                result = None
            if result:
                return result
            time.sleep(interval)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")

    def photograph(self, name: str) -> None:
        """The top of the page as a small palette PNG."""
        from PIL import Image

        self.driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        path = self.shots / f"webui-{name}.png"
        self.driver.save_screenshot(str(path))
        Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)
        assert path.stat().st_size > 10_000, f"{path} looks blank"


def test_train_chat_evaluate_and_preview_in_a_browser(web_ui, browser, tiny_model_dir, data_file, tmp_path):
    shots = tmp_path
    if os.environ.get("SFTKIT_SCREENSHOTS"):
        shots = __import__("pathlib").Path(os.environ["SFTKIT_SCREENSHOTS"])
        shots.mkdir(parents=True, exist_ok=True)
    page = Page(browser, shots)
    browser.get(web_ui["url"])
    page.wait(lambda: page.all("#train-start"), 30, "the page")

    # A dataset path that does not exist is reported in the page, not as a traceback.
    page.fill("train-model", tiny_model_dir)
    page.fill("train-dataset", "/no/such/data.jsonl")
    page.click("train-start")
    page.wait(lambda: "does not exist" in page.text("train-status"), 20, "the missing-path error")
    assert "/no/such/data.jsonl" in page.text("train-status") and "Traceback" not in browser.page_source

    # A few steps of LoRA on the tiny model; the command line shown is the one that runs.
    page.fill("train-dataset", data_file)
    page.fill("train-template", "chatml")
    page.fill("train-dataset_test_ratio", 0.25)
    page.fill("train-max_steps", 6)
    page.fill("train-learning_rate", "2e-4")  # little learned, so the chat answer runs long enough to watch it stream
    page.open_group("train-group-evaluation")
    page.fill("train-eval_steps", 3)
    page.fill("train-logging_steps", 1)
    expected = "--max_steps 6 --learning_rate 2e-4"
    page.wait(lambda: expected in page.value("train-command"), 10, "the command line to follow the form")
    page.click("train-start")
    page.wait(lambda: "running" in page.text("train-status"), 20, "the run to start")

    # A reloaded page re-attaches to the running job.
    browser.refresh()
    page.wait(lambda: "running" in page.text("train-status") or "finished" in page.text("train-status"), 30,
              "the reloaded page to show the job")
    assert page.value("train-max_steps") == "6", "the reloaded form shows the job's options"
    page.wait(lambda: "finished" in page.text("train-status") or "failed" in page.text("train-status"), 150,
              "the run to finish")
    assert "finished" in page.text("train-status"), page.value("train-log")
    assert "step 6/6" in page.text("train-progress")
    best = page.value("train-best")
    assert os.path.basename(best).startswith("checkpoint-") and os.path.isdir(best)
    page.wait(lambda: page.find("#train-loss-plot img").get_attribute("src").startswith("data:image/png"), 20,
              "the loss plot")
    assert "last evaluation, step 6: eval_loss" in page.text("train-status")
    page.photograph("train")

    page.click("train-merge")
    page.wait(lambda: "Merged model written to" in page.text("train-merged"), 60, "the merge")
    assert os.path.isfile(os.path.join(f"{best}-merged", "config.json"))

    # Chat with the checkpoint: the answer streams in.
    page.click("train-chat")
    page.wait(lambda: os.path.basename(best) in page.value("chat-ckpt_dir"), 10, "the chat tab to hold the checkpoint")
    page.open_group("chat-sampling")
    page.fill("chat-max_new_tokens", 200)
    page.fill("chat-message", "What is 1 plus 2?")
    # Every text the answer bubble shows is recorded as the page changes, however fast the tokens come.
    browser.execute_script("""
        window.replies = [];
        new MutationObserver(() => {
            const bubbles = document.querySelectorAll('#chat-bot .message.bot');
            const text = bubbles.length ? bubbles[bubbles.length - 1].innerText : '';
            if (text && window.replies[window.replies.length - 1] !== text) window.replies.push(text);
        }).observe(document.querySelector('#chat-bot'), {subtree: true, childList: true, characterData: true});
    """)
    page.click("chat-send")
    page.wait(lambda: "answered in" in page.text("chat-status"), 60, "the answer")
    replies = browser.execute_script("return window.replies")
    replies = [text for text in replies if text != "Loading content"]  # gradio's placeholder before the first piece
    assert len(replies) >= 3 and len(replies[0]) < len(replies[-1]), f"the answer did not stream: {replies}"
    page.photograph("chat")

    # Evaluate the checkpoint on the data: metrics and per-example scores.
    page.tab("train")
    page.click("train-evaluate")
    page.wait(lambda: os.path.basename(best) in page.value("eval-ckpt_dir"), 10, "the evaluate tab to hold the checkpoint")
    page.fill("eval-dataset", data_file)
    page.fill("eval-limit", 4)
    page.open_group("eval-generation")
    page.fill("eval-max_new_tokens", 12)
    page.click("eval-run")
    page.wait(lambda: "Report written" in page.text("eval-status") or "Error" in page.text("eval-status"), 90,
              "the evaluation")
    assert "rouge_l" in page.text("eval-scores") and "bleu4" in page.text("eval-scores"), page.text("eval-status")
    assert len(page.all("#eval-examples [role='gridcell'][data-col='0']")) == 4, "one row per example"
    page.photograph("evaluate")

    # Preview the data: trained tokens highlighted, lengths as a histogram.
    page.tab("data")
    page.fill("data-tokenizer", tiny_model_dir)
    page.fill("data-dataset", data_file)
    page.fill("data-template", "chatml")
    page.click("data-run")
    page.wait(lambda: "tokens per example" in page.text("data-status"), 30, "the preview")
    trained = [span.text for span in page.all("#data-tokens .token.highlighted")]
    assert trained and trained[0].startswith("0 plus 0 is 0."), f"the first answer is highlighted: {trained[:2]}"
    page.wait(lambda: page.find("#data-lengths img").get_attribute("src").startswith("data:image/png"), 10,
              "the length histogram")
    page.photograph("data")
