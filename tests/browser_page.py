"""Shared pieces of the real-browser tests: Debian's headless Chromium driven by selenium at a given
window size, the backend app (tiny random-weight engine) plus the Gradio page on free ports, small
DOM probes, and an input's change held in the page until a run it preceded began (``late_change_then_run``).
Screenshots go to test-artifacts/ (kept by CI as artifacts).

Browser tests are skipped when chromium/chromedriver/selenium are missing, unless REQUIRE_BROWSER=1
(then they fail).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
def serve_page(engine, slow_explain_s: float = 0.0, **backend_settings) -> Iterator[str]:
    """The backend (tiny models, at most 2 masks; no models when ``engine`` is None) and the explain
    page; yields the page's URL. ``slow_explain_s``: every explanation waits this long first (the
    models' work itself unchanged), so a test can act while a run is in its second step."""
    from backend.engine import Engine
    from explain_ui.app import UISettings, build_demo
    from explain_ui.client import BackendClient

    class SlowEngine(Engine):
        def explain_and_tell(self, *args: Any, **kwargs: Any) -> Any:  # under explain and segment too
            time.sleep(slow_explain_s)
            return super().explain_and_tell(*args, **kwargs)

    quick = None if engine is None else (SlowEngine if slow_explain_s else Engine)(
        engine.config.replace(max_detections=2), detector=engine.detector, segmenter=engine.segmenter)
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


def type_into(browser, selector: str, value: str) -> None:
    """Sets the text field ``selector`` to ``value`` with one DOM input event: one Gradio change (a
    Gradio ``.input`` comes from key presses only)."""
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.CSS_SELECTOR, selector)
    browser.execute_script("arguments[0].value = arguments[1];"
                           "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", box, value)


# The id of the server event (Gradio splits a listener's ``cancels`` into a page-only one) that
# ``arguments[1]`` (an event name) on the element ``#arguments[0]`` triggers.
EVENT_ID_JS = """
const config = window.gradio_config;
const component = config.components.find(c => c.props && c.props.elem_id === arguments[0]);
const found = config.dependencies.filter(d => d.backend_fn && d.targets.some(([id, name]) => id === component.id
                                                                                && name === arguments[1]));
return found.length === 1 ? found[0].id : null;
"""

# The text a progress line shows, without Gradio's status tracker on it (its timer, queue place, badges).
LINE_TEXT_JS = """
const lineText = el => { if (!el) return ''; const copy = el.cloneNode(true);
  copy.querySelectorAll('[data-testid=status-tracker]').forEach(t => t.remove()); return copy.textContent.trim(); };
"""

# Holds the requests of event ``arguments[0]`` (an unqueued event: a POST to /gradio_api/run/) in the page
# until the progress line ``arguments[1]`` names a step, as a slow server would answer them after the run
# began; counts them as they are held and notes the progress line as their answers come. Later requests
# go at once.
HOLD_EVENT_JS = LINE_TEXT_JS + """
const [fn, line] = arguments;
const send = window.fetch.bind(window);
const shown = () => lineText(document.querySelector(line));
window.held = {waiting: 0, answered: [], step: null};
const stepShown = () => new Promise(resolve => { const poll = () => {
  if (shown().startsWith('Step')) { window.held.step = shown(); resolve(); } else setTimeout(poll, 10); };
  poll(); });
window.fetch = async (url, init) => {
  let body = null;
  try { body = JSON.parse(init && init.body); } catch (e) { body = null; }
  if (!String(url).includes('/run/') || !body || body.fn_index !== fn) return send(url, init);
  window.held.waiting += 1;
  await stepShown();
  window.fetch = send;
  const answer = await send(url, init);
  await answer.clone().text();  // the whole answer is here (Gradio reads it next)
  window.held.answered.push([answer.status, shown()]);
  return answer;
};
"""

# Every text the progress line ``arguments[0]`` shows from now on (each change once), with whether the
# button ``arguments[1]`` was off at that moment (looked up each time: a re-rendered button is a new
# element) and the page's clock (ms).
RECORD_LINE_JS = LINE_TEXT_JS + """
const [lineSel, buttonSel] = arguments;
window.lines = [];
const line = document.querySelector(lineSel);
const off = () => { const b = document.querySelector(buttonSel);
                    return !!b && (b.disabled || b.getAttribute('aria-disabled') === 'true'); };
if (window.linesObserver) window.linesObserver.disconnect();  // one record at a time
window.linesObserver = new MutationObserver(() => {
  const text = lineText(line), last = window.lines[window.lines.length - 1];
  if (!last || last[0] !== text || last[1] !== off()) window.lines.push([text, off(), Math.round(performance.now())]);
});
window.linesObserver.observe(line, {subtree: true, childList: true, characterData: true});
"""


@dataclass
class LateChange:
    """What a tab's progress line showed from the run's first step on, and the held change's fate."""

    lines: list[list[Any]]  # [text, Run button off, ms] at each change of the line
    held: dict[str, Any]  # step: the line when the change was sent on; answered: [[HTTP status, line]]

    def step_only(self) -> bool:
        """Only the run's steps and its end showed: no blank line, no "inputs changed" note."""
        return all(text.startswith(("Step", "Done")) for text, *_ in self.lines)

    def busy_throughout(self) -> bool:
        return all(off for text, off, _ in self.lines if text.startswith("Step"))

    def answered_mid_run(self) -> bool:
        """The change went on once the run showed step 1 and was answered while a step still showed."""
        answered = self.held.get("answered") or []
        return (str(self.held.get("step") or "").startswith("Step 1") and len(answered) == 1
                and answered[0][0] == 200 and str(answered[0][1]).startswith("Step"))


def late_change_then_run(browser, tab: str, field: str, trigger: str, edit: Callable[[], None],
                         wait_s: float) -> LateChange:
    """Edits ``#field`` (``edit()``: one ``trigger`` event, which clears tab ``tab``), holds that event's
    request in the page, presses the tab's Run at once and sends the change on once the run shows its
    first step: an input changed just before Run, answered after the run began (CI under load saw it).
    Returns once the change was answered and the run ended or its progress line showed anything else."""
    from selenium.webdriver.support.ui import WebDriverWait

    event = browser.execute_script(EVENT_ID_JS, field, trigger)
    assert event is not None, f"no single server {trigger} event on #{field}"
    line = f"#{tab}-progress"
    browser.execute_script(HOLD_EVENT_JS, event, line)
    browser.execute_script(RECORD_LINE_JS, line, f"#{tab}-run")
    edit()
    WebDriverWait(browser, 20).until(lambda _: browser.execute_script("return window.held.waiting") == 1)
    browser.find_element("css selector", f"#{tab}-run").click()  # Run at once, the change still unanswered

    def since_first_step() -> list[list[Any]]:
        lines = browser.execute_script("return window.lines")
        first = next((i for i, (text, *_) in enumerate(lines) if text.startswith("Step")), len(lines))
        return lines[first:]

    WebDriverWait(browser, wait_s).until(lambda _: any(not text.startswith("Step") for text, *_ in since_first_step())
                                         and browser.execute_script("return window.held.answered.length"))
    time.sleep(1)  # a moment for the page to apply the change's answer
    return LateChange(since_first_step(), browser.execute_script("return window.held"))
