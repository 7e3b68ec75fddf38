"""The explain page as annotators use it, in headless Chromium at a desktop and a phone size (one page
load each, several checks per load; screenshots in test-artifacts/):

- a non-image upload and a backend failure each leave a lasting one-line error in their panel (not a
  pop-up, no broken image, no empty "Error" badges), and the next success clears it;
- Run names its steps on one progress line (no progress anywhere else) and disables the buttons
  until it is done;
- an explanation never stays beside masks of another image: photo B's masks never sit beside
  photo A's maps;
- every mask and map, with its whole caption and alt text, is inside the page width (no sideways
  scrolling, nothing hidden in a scrolling box, no caption cut); the colour bar sits beside the heatmaps;
- help text and the Run button reach WCAG's 4.5:1 contrast;
- without ?task= the task tab has no spinner; the scikit-image examples fill the inputs;
- an input's change sent just before Run but answered after the run began (held in the page until
  the run shows its first step) leaves the run alone: no blank progress line, no buttons turned on,
  its masks and maps stay; a change after the run still clears the panels.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser_page import (
    DESKTOP,
    LINE_TEXT_JS,
    PHONE,
    RECORD_LINE_JS,
    chromium,
    contrast,
    late_change_then_run,
    serve_page,
    shot,
    type_into,
)

UI_WAIT_S = 20  # page-only reactions (no model): an error line, a cleared panel
RUN_WAIT_S = 120  # a run on the tiny CPU models

MAPS = ("#image-encoder-heatmaps", "#image-encoder-overlays", "#image-decoder-maps", "#image-mask-looks")
PICTURES = ("#image-output", "#image-masks", *MAPS)

# One look at the page: natural sizes of the masks and maps on show, the progress indicators and where
# they are, the Run button, error badges.
SNAPSHOT_JS = """
const sizes = sel => [...document.querySelectorAll(sel + ' img')].filter(i => i.getAttribute('src'))
  .map(i => [i.naturalWidth, i.naturalHeight]);
const shown = el => el.offsetParent !== null && !el.classList.contains('hide');
const trackers = [...document.querySelectorAll('[data-testid=status-tracker]')].filter(shown)
  .filter(t => t.querySelector('.eta-bar, .progress-text, .meta-text-center, .meta-text, .loader, svg'));
const where = t => { const b = t.parentElement && t.parentElement.closest('[id]'); return b ? b.id : '?'; };
const run = document.querySelector('#image-run');
const line = document.querySelector('#image-progress');
return {
  progress: line ? line.textContent.trim() : '',
  masks: sizes('#image-masks'),
  maps: [].concat(...arguments[0].map(sizes)),
  busy: trackers.map(where),
  run_disabled: !!(run && (run.disabled || run.getAttribute('aria-disabled') === 'true')),
  badges: [...document.querySelectorAll('[data-testid=status-tracker] .error')].filter(shown)
    .map(e => e.textContent.trim()),
};
"""

# Every text the progress line shows from now on, with the Run button's state at that moment.
RECORD_STEPS_JS = """
window.steps = [];
const line = document.querySelector('#image-progress');
// The button as it is at each change (looked up again: a re-rendered button is a new element).
const off = () => { const run = document.querySelector('#image-run');
                    return !!run && (run.disabled || run.getAttribute('aria-disabled') === 'true'); };
if (line) new MutationObserver(() => window.steps.push([line.textContent.trim(), off()]))
  .observe(line, {subtree: true, childList: true, characterData: true});
"""

# Every picture of the Output and Explanation panels inside the page width and inside every box that
# clips or scrolls it; every caption whole; every picture with alt text.
LAYOUT_JS = """
const doc = document.documentElement, problems = [];
if (doc.scrollWidth > doc.clientWidth + 1)
  problems.push(`page scrolls sideways: ${doc.scrollWidth} > ${doc.clientWidth}`);
const hidden = el => {
  const r = el.getBoundingClientRect();
  if (r.left < -1 || r.right > doc.clientWidth + 1) return `outside the page width (${r.left}..${r.right})`;
  for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
    if (getComputedStyle(a).overflowX === 'visible') continue;
    const q = a.getBoundingClientRect();
    if (r.left < q.left - 1 || r.right > q.right + 1) return `hidden in a scrolling box (${a.className})`;
  }
  return null;
};
for (const sel of arguments[0]) {
  for (const img of document.querySelectorAll(sel + ' img')) {
    if (!img.getAttribute('src')) continue;
    const why = hidden(img);
    if (why) problems.push(`${sel} image ${why}`);
    if (!(img.getAttribute('alt') || '').trim()) problems.push(`${sel} image without alt text`);
  }
  for (const cap of document.querySelectorAll(sel + ' figcaption, ' + sel + ' .caption-label')) {
    const why = hidden(cap);
    if (why) problems.push(`${sel} caption "${cap.textContent}" ${why}`);
    if (cap.scrollWidth > cap.clientWidth + 1) problems.push(`${sel} caption cut: "${cap.textContent}"`);
  }
}
return problems;
"""

# The text colour of an element and the first opaque background behind it, as [r, g, b].
COLOURS_JS = """
const rgb = c => (c.match(/[\\d.]+/g) || []).map(Number);
const el = arguments[0];
let bg = null;
for (let a = el; a && !bg; a = a.parentElement) {
  const c = rgb(getComputedStyle(a).backgroundColor);
  if (c.length === 3 || (c.length === 4 && c[3] > 0.9)) bg = c.slice(0, 3);
}
return [rgb(getComputedStyle(el).color).slice(0, 3), bg || [255, 255, 255]];
"""


@pytest.fixture(scope="module")
def page(engine) -> Iterator[str]:
    with serve_page(engine) as url:
        yield url


@pytest.fixture(scope="module")
def photos(tmp_path_factory, chelsea, astronaut) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    # Text under an image's name: the browser lets it through as image/png.
    files = {"a": folder / "a.png", "b": folder / "b.png", "text": folder / "notes.png"}
    Image.fromarray(chelsea).save(files["a"])  # 451 x 300
    Image.fromarray(np.ascontiguousarray(astronaut[:, :256])).save(files["b"])  # 256 x 512: another aspect
    files["text"].write_text("these are notes, not a photo\n")
    return files


def aspects(sizes: list[list[int]]) -> set[float]:
    return {round(w / h, 1) for w, h in sizes if h}


def decoded(sizes: list[list[int]]) -> bool:
    """Some pictures, all of them decoded by the browser."""
    return bool(sizes) and all(w and h for w, h in sizes)


def watch_run(browser, until) -> list[dict]:
    """Snapshots of the page every ~0.1 s until ``until(snapshot)`` holds with nothing busy."""
    samples, deadline = [], time.monotonic() + RUN_WAIT_S
    while time.monotonic() < deadline:
        samples.append(browser.execute_script(SNAPSHOT_JS, list(MAPS)))
        last = samples[-1]
        if last["progress"].startswith("Done") and not last["busy"] and until(last):
            return samples
        time.sleep(0.1)
    raise AssertionError(f"the run did not finish in {RUN_WAIT_S} s; last look: {samples[-1]}")


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_page_keeps_state_layout_errors_and_progress_right(page, photos, size):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    name = "desktop" if size == DESKTOP else "phone"
    with chromium(*size) as browser:
        wait = WebDriverWait(browser, UI_WAIT_S)

        def text(selector: str) -> str:
            found = browser.find_elements(By.CSS_SELECTOR, selector)
            return found[0].text.strip() if found else ""

        def set_prompt(value: str) -> None:
            box = browser.find_element(By.CSS_SELECTOR, "#image-prompt textarea")
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(Keys.DELETE)
            browser.execute_script("arguments[0].value = arguments[1];"
                                   "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", box, value)

        def upload(path: Path) -> None:
            browser.find_element(By.CSS_SELECTOR, "#image-input input[type=file]").send_keys(str(path))

        browser.get(page)
        try:
            wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#image-input input[type=file]"))

            # -- contrast of help text and the Run button (WCAG AA for text: 4.5:1) --
            help_text = browser.find_element(By.XPATH, "//*[@id='image-box']//*[contains(text(), 'fewer') "
                                                       "or contains(text(), 'lower finds')]")
            for what, element in (("slider help text", help_text),
                                  ("Run button", browser.find_element(By.CSS_SELECTOR, "#image-run"))):
                fg, bg = browser.execute_script(COLOURS_JS, element)
                assert contrast(fg, bg) >= 4.5, f"{what}: {fg} on {bg} is {contrast(fg, bg):.1f}:1"

            # -- an example (a scikit-image photo) fills the image and the prompt --
            example = [b for b in browser.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == "chelsea: cat"]
            assert example, "no scikit-image examples on the page"
            example[0].click()
            wait.until(lambda _: browser.execute_script(
                "const i = document.querySelector('#image-input img'); return i && i.naturalWidth") == 451)
            assert browser.find_element(By.CSS_SELECTOR, "#image-prompt textarea").get_attribute("value") == "cat"

            # -- a file that isn't an image: a lasting message in the Input panel, no broken preview --
            upload(photos["text"])
            wait.until(lambda _: "notes.png" in text("#image-input-error"))
            assert "image" in text("#image-input-error")
            broken = browser.execute_script("return [...document.querySelectorAll('#image-input img')]"
                                            ".filter(i => i.complete && i.naturalWidth === 0).length")
            assert broken == 0, "a broken image icon in the Input panel"

            # -- a backend failure (one prompt phrase longer than Grounding DINO reads): the Output panel --
            upload(photos["a"])
            set_prompt(" ".join(["cat"] * 300))
            browser.find_element(By.CSS_SELECTOR, "#image-run").click()
            wait.until(lambda _: "too long" in text("#image-output-error"))
            time.sleep(1.5)  # still there once the run has ended
            look = browser.execute_script(SNAPSHOT_JS, list(MAPS))
            assert "too long" in text("#image-output-error") and not look["busy"]
            assert not look["badges"], f"error badges without text: {look['badges']}"
            shot(browser, f"page_state_{name}_error.png")

            # -- photo A runs: one progress line, buttons off meanwhile; success clears both errors --
            set_prompt("cat . rocket")
            browser.execute_script(RECORD_STEPS_JS)
            browser.find_element(By.CSS_SELECTOR, "#image-run").click()
            samples = watch_run(browser, lambda s: decoded(s["masks"]) and decoded(s["maps"]))
            steps = browser.execute_script("return window.steps")
            busy = [(line, disabled) for line, disabled in steps if line.startswith("Step")]
            assert {line[:11] for line, _ in busy} == {"Step 1 of 2", "Step 2 of 2"}, f"steps not named: {steps}"
            assert all(disabled for _, disabled in busy), f"the Run button stays enabled while busy: {steps}"
            spinners = {where for s in samples for where in s["busy"]}
            assert spinners <= {"image-progress"}, f"progress must show on the progress line only: {spinners}"
            assert all(s["run_disabled"] for s in samples if s["progress"].startswith("Step"))
            assert not samples[-1]["run_disabled"], "the Run button is enabled again when done"
            assert text("#image-output-error") == "" and text("#image-input-error") == ""
            assert not samples[-1]["badges"]
            a = aspects(samples[-1]["masks"])
            assert a == {1.5} and aspects(samples[-1]["maps"]) == a, samples[-1]

            # -- photo B: A's maps never sit beside B's masks, not even before B runs --
            upload(photos["b"])
            wait.until(lambda _: not browser.execute_script(SNAPSHOT_JS, list(MAPS))["maps"])
            browser.find_element(By.CSS_SELECTOR, "#image-run").click()
            samples = watch_run(browser, lambda s: aspects(s["masks"]) == {0.5} and decoded(s["maps"]))
            stale = [s for s in samples if aspects(s["maps"]) & a]
            assert not stale, f"photo A's maps still on show after photo B was uploaded: {stale[0]}"
            assert aspects(samples[-1]["maps"]) == {0.5} and not samples[-1]["run_disabled"]
            # Run scrolled the result into view (on a phone it is below the form).
            top = browser.execute_script("return document.querySelector('#image-progress')"
                                         ".getBoundingClientRect().top")
            assert 0 <= top < size[1] / 2, f"the progress line is at {top} px, not in view"

            # -- the colour bar and its words beside the heatmaps (not a page further down) --
            gap = browser.execute_script("return document.querySelector('#image-encoder-heatmaps img')"
                                         ".getBoundingClientRect().top - document.querySelector("
                                         "'#image-legend [style*=linear-gradient]').getBoundingClientRect().bottom")
            assert 0 <= gap < 150, f"the colour bar is {gap:.0f} px from the heatmaps"

            # -- every mask and map, its whole caption and its alt text, inside the page width --
            problems = browser.execute_script(LAYOUT_JS, list(PICTURES))
            assert not problems, "\n".join(problems)
            shot(browser, f"page_state_{name}.png")

            # -- a threshold moved: the masks and maps on show no longer match it, so they go --
            number = browser.find_element(By.CSS_SELECTOR, "#image-box input[type=number]")
            number.send_keys(Keys.CONTROL, "a")
            number.send_keys("0.5", Keys.TAB)
            wait.until(lambda _: not any(browser.execute_script(SNAPSHOT_JS, list(MAPS))[k] for k in ("masks", "maps")))

            # -- the task tab, opened without ?task=, spins nowhere --
            tab = [b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "task" in b.text.lower()]
            tab[0].click()
            time.sleep(2)
            spinning = browser.execute_script(SNAPSHOT_JS, list(MAPS))["busy"]
            assert not spinning, f"spinners on the task tab without ?task=: {spinning}"
        finally:
            shot(browser, f"page_state_{name}_last.png")


def test_a_change_answered_after_run_began_leaves_the_run_alone(page, photos):
    """Typing and pressing Run at once, with the typing's change answered only after the run showed its
    first step (CI under load recorded it answered late): the run's progress line, buttons, masks and
    maps are left alone; the run ends as usual; a change after it still clears the panels, and one
    during a run still stops it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def progress() -> str:  # without Gradio's timer on the line
        return browser.execute_script(LINE_TEXT_JS + "return lineText(document.querySelector('#image-progress'));")

    with chromium(*DESKTOP) as browser:
        wait = WebDriverWait(browser, UI_WAIT_S)
        browser.get(page)
        try:
            wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#image-input input[type=file]"))
            browser.find_element(By.CSS_SELECTOR, "#image-input input[type=file]").send_keys(str(photos["a"]))
            wait.until(lambda _: browser.execute_script(
                "const i = document.querySelector('#image-input img'); return i && i.naturalWidth") == 451)
            type_into(browser, "#image-prompt textarea", "cat")
            wait.until(lambda _: progress().startswith("Press Run"))  # the change was answered

            race = late_change_then_run(browser, "image", "image-prompt", "change",
                                        lambda: type_into(browser, "#image-prompt textarea", "cat . rocket"),
                                        RUN_WAIT_S)
            assert race.step_only(), f"the late change's answer changed the progress line mid-run: {race.lines}"
            assert race.busy_throughout(), f"the Run button came on mid-run: {race.lines}"
            assert race.answered_mid_run(), race.held
            watch_run(browser, lambda _: True)  # nothing busy any more
            # The run's masks and maps are on show (decoded a moment after "Done").
            wait.until(lambda _: (lambda s: decoded(s["masks"]) and decoded(s["maps"]))(
                browser.execute_script(SNAPSHOT_JS, list(MAPS))), "the run's masks and maps are not on show")
            last = browser.execute_script(SNAPSHOT_JS, list(MAPS))
            assert last["progress"].startswith("Done") and not last["run_disabled"], last
            assert aspects(last["masks"]) == {1.5} and aspects(last["maps"]) == {1.5}, last

            # -- a change after the run still clears the panels --
            type_into(browser, "#image-prompt textarea", "cat")
            wait.until(lambda _: progress().startswith("Press Run"))
            look = browser.execute_script(SNAPSHOT_JS, list(MAPS))
            assert not look["masks"] and not look["maps"] and not look["run_disabled"], look

            # -- and one during a run stops it: the panels stay cleared, the buttons on --
            browser.execute_script(RECORD_LINE_JS, "#image-progress", "#image-run")
            browser.find_element(By.CSS_SELECTOR, "#image-run").click()
            WebDriverWait(browser, UI_WAIT_S, poll_frequency=0.02).until(lambda _: any(  # edit while it runs
                text.startswith("Step") for text, *_ in browser.execute_script("return window.lines")))
            type_into(browser, "#image-prompt textarea", "rocket")
            wait.until(lambda _: progress().startswith("Press Run"))
            time.sleep(3)  # a run that went on would show its next step or its masks by now
            lines = browser.execute_script("return window.lines")
            assert not any(text.startswith("Done") for text, *_ in lines), f"the run ended before the edit: {lines}"
            assert lines[-1][0].startswith("Press Run"), f"the run went on after the edit: {lines}"
            look = browser.execute_script(SNAPSHOT_JS, list(MAPS))
            assert look["progress"].startswith("Press Run") and not look["masks"] and not look["maps"], look
            assert not look["run_disabled"] and not look["busy"] and not look["badges"], look
        finally:
            shot(browser, "page_state_late_change_last.png")
