"""The app in a real browser: Debian's Chromium driven by Playwright, against `python app.py` on localhost.

Compose the demo adapters with Merge and CMLoRA and see images; train an adapter from 5 uploaded images and use
it in Compose; bad input shows a readable message and the app keeps serving. Screenshots of the three tabs go
to docs/screenshots/.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from studio.data import procedural

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                                "(.ci/run installs it: apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    port = _free_port()
    env = {**os.environ, "STUDIO_HOME": str(home), "STUDIO_OUTPUTS": str(home / "outputs"), "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "STUDIO_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=home, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("the app exited during start-up") from None
            time.sleep(0.5)
    yield url, home
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(120_000)
        page.goto(server[0])
        page.get_by_text("Adapter Studio").first.wait_for()
        yield page
        browser.close()


def _enable_row(page, index: int, adapter: str, weight: str = "1.0") -> None:
    checkbox = page.locator(f"#row{index}-on input[type=checkbox]")
    if not checkbox.is_checked():
        checkbox.check()
    box = page.locator(f"#row{index}-adapter input")
    box.fill(adapter)
    box.press("Enter")
    weight_box = page.locator(f"#row{index}-weight textarea, #row{index}-weight input").first
    weight_box.fill(weight)


def _gallery_count(page) -> int:
    return page.locator("#gallery img").count()


def _toast(page, text: str) -> None:
    page.get_by_text(text).first.wait_for()


def test_compose_demo_adapters_with_cmlora_and_merge(page):
    _enable_row(page, 0, "sks-moon")
    _enable_row(page, 1, "zwx-zigzag")
    prompt = page.locator("#prompt textarea")
    prompt.fill("a red zwx sks on a white background")
    page.locator("#method").get_by_text("cmlora", exact=True).click()
    page.locator("#generate").click()
    page.wait_for_function("document.querySelectorAll('#gallery img').length >= 1")
    assert _gallery_count(page) >= 1
    page.get_by_text("seed 1 · cmlora").first.wait_for()
    page.locator("#method").get_by_text("merge", exact=True).click()
    page.locator("#generate").click()
    page.get_by_text("seed 1 · merge").first.wait_for()
    assert _gallery_count(page) >= 1
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)  # Merge draws both concepts at seed 1: two red zigzag moons
    page.screenshot(path=str(SCREENSHOTS / "compose.png"), full_page=True)


def test_send_to_img2img_with_a_sampler(page):
    page.locator("#img2img").get_by_text("img2img / inpaint").click()
    page.locator("#send-to-img2img input[type=checkbox]").check()
    page.locator("#gallery img").first.click()
    page.wait_for_function("document.querySelectorAll('#init-image canvas, #init-image img').length >= 1")
    sampler = page.locator("#sampler input")
    sampler.fill("DPM++ 2M")
    sampler.press("Enter")
    page.locator("#method").get_by_text("cmlora", exact=True).click()
    page.locator("#generate").click()
    page.get_by_text("seed 1 · cmlora · img2img").first.wait_for()
    assert _gallery_count(page) >= 1
    page.screenshot(path=str(SCREENSHOTS / "img2img.png"), full_page=True)
    page.locator("#send-to-img2img input[type=checkbox]").uncheck()


def test_bad_weight_and_unknown_model_show_messages(page, server):
    _enable_row(page, 0, "sks-moon", weight="strong")
    page.locator("#generate").click()
    _toast(page, "must be a finite number")
    _enable_row(page, 0, "sks-moon", weight="1.0")
    model_box = page.get_by_label("Base model (empty = the embedded tiny-sd; or a folder / .safetensors file)")
    model_box.fill("/no/such/model")
    page.locator("#generate").click()
    _toast(page, "no model at")
    model_box.fill("")
    urllib.request.urlopen(server[0], timeout=5)  # still serving


def test_train_from_uploads_then_use_it_in_compose(page, server, tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for index, color in enumerate(["red", "blue", "green", "yellow", "purple"]):
        path = tmp_path / f"cross{index}.png"
        Image.fromarray(procedural.render(procedural.jittered_scene(rng, color, "solid", "cross", "white"))).save(path)
        files.append(str(path))
    page.get_by_role("tab", name="Train").click()
    page.locator("#train").click()
    _toast(page, "Upload a handful")
    page.locator("#train-files input[type=file]").set_input_files(files)
    page.wait_for_timeout(1500)
    page.locator("#trigger textarea, #trigger input").first.fill("qwe")
    page.locator("#instance-prompt textarea, #instance-prompt input").first.fill("a photo of qwe toy")
    steps = page.locator("#train-steps input[type=number]")
    steps.fill("3")
    steps.press("Enter")
    page.locator("#train").click()
    page.locator("#train-status").get_by_text("s per step (measured)").wait_for()
    page.locator("#train-status").get_by_text("done").wait_for()
    assert "qwe-lora-content.safetensors" in page.locator("#train-status").inner_text()
    with safe_open(str(server[1] / "adapters" / "qwe-lora-content.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["ss_tag_frequency"])["images"] == {"a photo of qwe toy": 5}
    page.screenshot(path=str(SCREENSHOTS / "train.png"), full_page=True)
    assert (server[1] / "adapters" / "qwe-lora-content.safetensors").exists()
    page.get_by_role("tab", name="Compose").click()
    _enable_row(page, 2, "qwe-lora-content")
    page.locator("#method").get_by_text("composite", exact=True).click()
    page.locator("#generate").click()
    page.get_by_text("seed 1 · composite").first.wait_for()
    assert _gallery_count(page) >= 1
    page.get_by_role("tab", name="Library").click()
    page.get_by_role("button", name="Refresh").click()
    page.wait_for_function("document.querySelector('#library').innerText.includes('qwe-lora-content')")
    page.screenshot(path=str(SCREENSHOTS / "library.png"), full_page=True)
