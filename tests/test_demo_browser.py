"""End to end: scripts/demo.py served on a free loopback port, driven in headless Chromium.

Needs the demo extra (gradio, Playwright's Python client) and a Chromium: the system's
(Debian's `chromium`, found on PATH or through $DEMO_CHROMIUM) or one installed by
`python -m playwright install chromium`. `.ci/run` installs both; where they are missing the
test is skipped with the reason, except under CI (CI=true), where that is a failure.
Marked slow, so run it by name: pytest -m slow tests/test_demo_browser.py (.ci/run does).
Screenshots go to the test's tmp folder and to test-artifacts/ (git-ignored).
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # ~1-2 min (a Gradio server, a browser, a dozen digits runs); .ci/run runs it

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 180_000   # a click on a busy 2-core machine: MACs counting and sampling, the first one twice
# Chromium as the machine's closed network needs it: no sandbox (root), no background connections
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]


def missing(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must run the browser test: .ci/run installs what it needs)")
    pytest.skip(reason)


def find_chromium() -> str | None:
    """A system Chromium, or None to let Playwright use its own (python -m playwright install chromium)."""
    if os.environ.get("DEMO_CHROMIUM"):
        return os.environ["DEMO_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """scripts/demo.py in a subprocess on 127.0.0.1:<free port>; yields its URL."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        missing('gradio is not installed: pip install -e ".[demo]"')
    port = free_port()
    log_path = tmp_path_factory.mktemp("demo_server") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "scripts/demo.py", "--host", "127.0.0.1", "--port", str(port),
                                 "--work-dir", str(tmp_path_factory.mktemp("demo_runs"))],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"scripts/demo.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"scripts/demo.py did not serve {url} within 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(log_path.read_text()[-2000:])


@pytest.fixture(scope="module")
def page(server):
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        missing('playwright is not installed: pip install -e ".[demo]"')
    chromium = find_chromium()
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        except Error as e:
            missing(f"no Chromium could be started ({chromium or 'Playwright’s own'}): {str(e).splitlines()[0]}; "
                    "install Debian's `chromium` (apt-get install chromium) "
                    "or run `python -m playwright install chromium`")
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server)
        page.wait_for_selector("#generate")
        yield page
        browser.close()


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / name)
    assert shot.stat().st_size > 10_000   # a rendered page, not an empty one
    return shot


def fill(page, selector: str, value: str) -> None:
    box = page.locator(selector)
    box.fill(value)
    box.press("Tab")   # Gradio takes a typed value on change / blur


def click_and_wait(page, button: str, status_class: str) -> str:
    """Click, wait until the status message (not the progress overlay beside it) is replaced by one
    of `status_class`; return the message."""
    message = "#status p.demo-ok, #status p.demo-error"
    before = page.locator(message).inner_text() if page.locator(message).count() else ""
    page.click(button)
    page.wait_for_function(
        "([before, cls]) => { const p = document.querySelector('#status p.' + cls);"
        " return p !== null && p.innerText !== before; }",
        arg=[before, status_class], timeout=TIMEOUT_MS)
    return page.locator(f"#status p.{status_class}").inner_text()


def test_generate_shows_images_and_time_and_survives_a_bad_setting(page, tmp_path):
    # a fraction typed into the slider's box and fewer steps: the small model must run 12 of 20
    fill(page, "#fraction input[type=number]", "0.6")
    fill(page, "#steps input", "20")
    status = click_and_wait(page, "#generate", "demo-ok")
    assert re.search(r"Generated 10 images in \d+\.\d+ s", status), status
    summary = page.locator("#summary").inner_text()
    assert re.search(r"Sampling time: \d+\.\d+ s", summary), summary
    assert "DiT-digits-S 12, DiT-digits-L 8 of 20" in summary, summary
    assert re.search(r"speed-up against DiT-digits-L alone: \d+\.\d+x", summary), summary
    assert page.locator("#gallery img").count() == 10
    save_screenshot(page, tmp_path, "demo_generate.png")

    # a bad setting typed in the page: a message, no traceback, the old results stay
    fill(page, "#labels textarea, #labels input", "3, x")
    status = click_and_wait(page, "#generate", "demo-error")
    assert "Error: class label 'x' is not allowed" in status and "0..9" in status, status
    assert "Traceback" not in page.content()
    save_screenshot(page, tmp_path, "demo_error.png")

    # the next valid click works
    fill(page, "#labels textarea, #labels input", "1, 7")
    fill(page, "#num_samples input", "8")
    status = click_and_wait(page, "#generate", "demo-ok")
    assert "Generated 8 images" in status, status
    captions = page.locator("#gallery").inner_text()
    assert captions.count("class 7") == 4 and "class 0" not in captions, captions
    assert page.locator("#gallery img").count() == 8


def test_sweep_plots_quality_and_time(page, tmp_path):
    fill(page, "#steps input", "10")
    fill(page, "#labels textarea, #labels input", "0, 1, 2, 3, 4, 5, 6, 7, 8, 9")
    fill(page, "#sweep_fractions textarea, #sweep_fractions input", "0, 0.5, 1")
    fill(page, "#sweep_samples input", "20")
    status = click_and_wait(page, "#sweep", "demo-ok")
    assert "Swept 3 fractions (20 images each, ddim 10 steps)" in status, status
    table = page.locator("#sweep_table").inner_text()
    for row in ("0\t0 / 10", "0.5\t5 / 5", "1\t10 / 0"):
        assert row in table, table
    # the plot's image can arrive a moment after the status text: wait for it, then count
    page.wait_for_selector("#sweep_plot img", timeout=30_000)
    assert page.locator("#sweep_plot img").count() == 1
    save_screenshot(page, tmp_path, "demo_sweep.png")


def test_missing_weights_are_a_message_in_the_page(page):
    page.locator("#pair input").click()
    page.get_by_role("option", name="DiT-S/2 -> DiT-XL/2").click()
    page.wait_for_function("() => document.querySelector('#pair_note').innerText.includes('T-Stitch')")
    page.get_by_text("weights (blank: the pair's default)").click()
    fill(page, "#weights_small textarea, #weights_small input", "/nowhere/dit_s_256.pt")
    status = click_and_wait(page, "#generate", "demo-error")
    assert "Weights missing" in status and "/nowhere/dit_s_256.pt" in status and "small model weights" in status, status
    # back to the digits pair: its defaults return and a click works again
    page.locator("#pair input").click()
    page.get_by_role("option", name="digits: DiT-digits-S").click()
    page.wait_for_function("() => document.querySelector('#labels textarea, #labels input')"
                           ".value.startsWith('0, 1, 2')")
    fill(page, "#steps input", "10")
    status = click_and_wait(page, "#generate", "demo-ok")
    assert "Generated 10 images" in status, status
