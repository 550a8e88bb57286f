"""The dashboard end to end: real VMs, the real server, a real headless Chromium.

Debian's chromium is driven through Playwright (never `playwright install`: it downloads a
browser from outside the package registries). The page's screenshot is saved under
test-artifacts/ for a human to look at.
"""
from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path

import pytest

from vmlab import Env

pytestmark = pytest.mark.vm

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
MARK = "dashboard-check-line"


def _start_in_background(env: Env) -> tuple[threading.Thread, list]:
    errors: list = []

    def run():
        try:
            env.start()
        except BaseException as err:  # re-raised by the test
            errors.append(err)

    t = threading.Thread(target=run, name="env-start", daemon=True)
    t.start()
    return t, errors


def _wait(what: str, cond, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_dashboard_in_chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install '.[test]'")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed; run scripts/setup.sh")
    from PIL import Image

    env = Env(name="test_vm_dashboard", web="127.0.0.1:0")
    home = env.add_network(name="home", wan_ip="2.1.1.1", lan="192.168.1.0/24", nat="easy")
    alice = env.add_node(home, name="alice")
    bob = env.add_node(home, name="bob")
    check = env.step("alice pings bob")
    starter, start_errors = _start_in_background(env)
    try:
        url = _wait("the dashboard URL", lambda: env.dashboard.url or start_errors)
        assert isinstance(url, str), start_errors
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                         headless=True)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#node-alice")
            step = page.locator("#steps li", has_text="alice pings bob")
            assert step.get_attribute("class") == "step step-pending"
            assert step.locator(".step-icon").inner_text() == "○"

            starter.join(300)
            assert not starter.is_alive(), "Env.start() did not finish within 300 s"
            if start_errors:
                raise start_errors[0]
            # Every framework step is done, live, without a reload.
            page.wait_for_function(
                "() => [...document.querySelectorAll('#steps li')].filter(li =>"
                " li.textContent.includes(':')).every(li => li.classList.contains('step-done'))",
                timeout=30_000)
            page.wait_for_selector("#agent-alice.ok", timeout=30_000)

            with check:
                page.wait_for_selector("#steps li.step-running:has-text('alice pings bob')",
                                       timeout=10_000)
                assert alice.ping(bob.lan_ip(), count=2).ok
            page.wait_for_selector("#steps li.step-done:has-text('alice pings bob')",
                                   timeout=10_000)

            # A console line arrives: written into the pipe /init's output goes through, so
            # it reaches both the serial console (console.log) and the screen.
            first_thumb = page.wait_for_selector("#shot-alice img", timeout=30_000) \
                .get_attribute("src")
            assert first_thumb.startswith("data:image/jpeg;base64,")
            alice.exec(f"echo {MARK} > /run/console.fifo", check=True)
            page.wait_for_selector(f"#console-alice .line:has-text('{MARK}')", timeout=15_000)
            assert MARK in alice.console_tail(20)  # console.log keeps working

            # The screen changes with that line: a new thumbnail arrives.
            page.wait_for_function(
                "old => document.querySelector('#shot-alice img').src !== old", arg=first_thumb,
                timeout=15_000)

            # The full-size screen opens from the thumbnail.
            with page.context.expect_page() as opened:
                page.click("#shot-alice")
            full = opened.value
            full.wait_for_load_state()
            assert full.url == url + "screenshot/alice"
            assert full.evaluate("document.images[0].naturalWidth") == 720
            png = full.request.get(url + "screenshot/alice").body()
            screen = Image.open(io.BytesIO(png)).convert("RGB")
            # screen.py's status bar (black on light grey) fills the top text row.
            r, g, b = screen.getpixel((700, 6))  # VGA's light grey is about (168, 168, 168)
            assert r == g == b and 140 < r < 200, "the guest did not draw its screen"
            full.close()
            assert page.request.get(url + "screenshot/mallory").status == 404

            env.dashboard.test_status("passed")
            page.wait_for_selector("#test-status.badge-passed", timeout=10_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.wait_for_timeout(300)  # let the console's scroll position settle
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            (ARTIFACTS / "dashboard-screen-alice.png").write_bytes(png)
            browser.close()
    finally:
        starter.join(300)
        env.close()
