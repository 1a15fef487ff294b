"""petal-api with the real SmolLM2 on a 3-node swarm (0:10, 10:20, 20:30): a streamed chat completion through
the openai client, and the web chat page in Debian's headless chromium (selenium + /usr/bin/chromedriver)."""

from __future__ import annotations

import os

import pytest
from openai import OpenAI
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from petal_client.api.process import ApiProcess
from petald.local_swarm import local_swarm

pytestmark = pytest.mark.real_model
MODEL = "smollm2-135m"
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def api_url(smollm2, petal_test_home, tmp_path_factory):
    logs = tmp_path_factory.mktemp("api-smollm2")
    env = {**os.environ, "PETAL_HOME": str(petal_test_home)}
    with local_swarm(logs, env) as nodes:
        first = nodes.start("start", "--model", MODEL, "--blocks", "0:10", "--port", "0", "--new-swarm")
        others = [
            nodes.start("start", "--model", MODEL, "--blocks", blocks, "--port", "0", "--initial-peers", first.addr)
            for blocks in ("10:20", "20:30")
        ]
        for node in (first, *others):
            node.wait_serving()
        with ApiProcess(["--initial-peers", first.addr, "--model", MODEL, "--port", "0"], logs / "api.log", env) as api:
            yield api.wait_url()


def test_smollm2_chat_completion_streams_the_plain_answer(api_url):
    client = OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": QUESTION}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32)
    text = plain.choices[0].message.content
    assert "Paris" in text, text
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert len(chunks) > 5 and chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].model_extra["petal"] == {"servers": 3, "failovers": 0}


def test_the_web_chat_streams_an_answer_in_chromium(api_url, browser, tmp_path):
    browser.get(api_url + "/")
    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    wait.until(lambda b: Select(b.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == MODEL)
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("48")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys(QUESTION)
    browser.find_element(By.ID, "send").click()

    def answer() -> str:
        return browser.find_element(By.CSS_SELECTOR, ".assistant .text").text

    def meta() -> str:
        return browser.find_element(By.CSS_SELECTOR, ".assistant .meta").text

    # streamed: part of the answer is on the page while it is still being generated (stop button shown)
    partial = wait.until(lambda b: answer() if answer() and b.find_element(By.ID, "stop").is_displayed() else None)
    wait.until(lambda b: meta())
    final = answer()
    assert len(final) > len(partial) and final.startswith(partial), (partial, final)
    assert "Paris" in final
    assert meta().startswith("3 servers · no failover · "), meta()
    assert browser.find_element(By.CSS_SELECTOR, ".user").text == QUESTION
    shot = tmp_path / "web-chat.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot of the web chat: {shot}")
