"""Shared pieces of the real-browser tests: Debian's headless Chromium driven by selenium at a given
window size, the backend app (tiny random-weight engine) plus the Gradio page on free ports, and small
DOM probes. Screenshots go to test-artifacts/ (kept by CI as artifacts).

Browser tests are skipped when chromium/chromedriver/selenium are missing, unless REQUIRE_BROWSER=1
(then they fail).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.ui_servers import ThreadedBackend, free_port

DESKTOP = (1440, 900)
PHONE = (390, 844)

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT_S = 180  # CPU-only models: a first segmentation takes a while


def browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: run scripts/install_browser.sh"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed in this venv (requirements.lock)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1600, height: int = 2200) -> Iterator[object]:
    """A headless Chromium (selenium WebDriver) with a ``width`` x ``height`` window; skips (or fails
    under REQUIRE_BROWSER=1) when the browser is missing. The viewport is exactly ``width`` x ``height``
    (a phone's size without its touch events or user agent)."""
    missing = browser_missing()
    if missing:
        if os.environ.get("REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail(f"REQUIRE_BROWSER is set but {missing}", pytrace=False)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    # An explicit chromedriver: selenium never fetches a browser or driver of its own.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    # Headless Chromium keeps windows at least 500 px wide: the viewport is set exactly, so PHONE is 390.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def serve_page(engine, **backend_settings) -> Iterator[str]:
    """The backend (tiny models, at most 2 masks; no models when ``engine`` is None) and the explain
    page; yields the page's URL."""
    from backend.engine import Engine
    from explain_ui.app import UISettings, build_demo
    from explain_ui.client import BackendClient

    quick = None if engine is None else Engine(engine.config.replace(max_detections=2), detector=engine.detector,
                                                segmenter=engine.segmenter)
    with ThreadedBackend(quick, **backend_settings) as backend:
        if backend.app.extensions["grounded_sam"].runner is not None:
            backend.app.extensions["grounded_sam"].runner.stop()  # jobs move only when a test moves them
        # Thresholds the tiny random models find boxes at, as the sliders' starting values.
        demo = build_demo(BackendClient(backend.url), UISettings(box_threshold=0.2, text_threshold=0.2))
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()


def images(browser, selector: str) -> list:
    """The <img>s under ``selector`` that have a source."""
    from selenium.webdriver.common.by import By

    return [img for img in browser.find_elements(By.CSS_SELECTOR, f"{selector} img")
            if (img.get_attribute("src") or "").strip()]


def busy(browser) -> int:
    """How many progress/timer indicators Gradio shows (an event still pending on some output)."""
    from selenium.webdriver.common.by import By

    return len(browser.find_elements(By.CSS_SELECTOR, ".eta-bar, .progress-text, .meta-text-center, .meta-text"))


def contrast(fg: Sequence[float], bg: Sequence[float]) -> float:
    """WCAG 2 contrast ratio of two sRGB colours given as 0..255 [r, g, b] (text needs 4.5:1)."""

    def luminance(colour: Sequence[float]) -> float:
        c = [v / 255 for v in colour[:3]]
        c = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    high, low = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def shot(browser, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / name))
