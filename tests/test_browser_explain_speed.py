"""Explain of an already-segmented 1-megapixel photo, timed in a real browser (issue 13 item 6).

Chromium uploads a ~1000 x 1000 scikit-image photo, runs the segmentation (so the backend holds the
explanation in its cache), then clicks Run again (three times: the best is the page's own time, the
rest the shared CPU's): the page segments (a cache hit, step 1 of its progress line) and explains at
once (step 2). What is timed is the explanation: from the moment the progress line says step 2 began
to every explanation grid holding decoded images again, taken in the page itself
(``performance.now()``, polled each animation frame), so selenium's round trips do not count; the
whole Run is recorded beside it in the artifact.
Screenshots are kept in
test-artifacts/. Skipped when chromium/chromedriver/selenium are missing, unless REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.browser_page import ARTIFACTS, DESKTOP, PHONE, WAIT_S, chromium, images, serve_page, shot

pytestmark = pytest.mark.e2e  # a real browser (its own per window size, not the ``browser`` fixture)

PAINT_LIMIT_S = 1.0  # the target for a cache hit
# Every click is a cache hit; the best of a few is the page's time, a slower one the shared machine's.
CLICKS = 3
SIDE = 1000  # ~1 megapixel
GALLERIES = ("encoder-heatmaps", "encoder-overlays", "decoder-maps", "mask-looks")

# Clicks Run and resolves with [seconds from step 2 (explaining) to painted, seconds from the click to
# painted]: painted is every grid holding images that have decoded (naturalWidth > 0) and the progress
# line saying the run is done. A run first clears the explanation, so grids full before the click
# count only after they were seen empty (this click's answer). A step 2 never seen counts from the click.
TIME_EXPLAIN_JS = """
const [button, galleries, limitMs, done] = [arguments[0], arguments[1], arguments[2], arguments[arguments.length - 1]];
const finished = () => /Done in/.test((document.querySelector('#image-progress') || {}).textContent || '');
const filled = () => galleries.every(id => {
  const imgs = [...document.querySelectorAll('#' + id + ' img')].filter(i => (i.getAttribute('src') || '').trim());
  return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
});
const explaining = () => /Step 2/.test((document.querySelector('#image-progress') || {}).textContent || '');
let sawCleared = !filled();
const start = performance.now();
let stepTwo = null;
button.click();
const poll = () => {
  const now = performance.now(), elapsed = now - start;
  sawCleared = sawCleared || !filled();
  if (stepTwo === null && explaining()) stepTwo = now;
  if (sawCleared && filled() && finished()) { done([(now - (stepTwo ?? start)) / 1000, elapsed / 1000]); return; }
  if (elapsed > limitMs) { done([-1, -1]); return; }
  requestAnimationFrame(poll);
};
requestAnimationFrame(poll);
"""


@pytest.fixture(scope="module")
def megapixel_photo(tmp_path_factory):
    import cv2
    import skimage.data

    rgb = cv2.resize(skimage.data.astronaut(), (SIDE, SIDE), interpolation=cv2.INTER_CUBIC)
    path = tmp_path_factory.mktemp("photo") / "astronaut-1mp.png"
    Image.fromarray(rgb).save(path)
    return path


@pytest.mark.parametrize("window", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_explain_of_a_segmented_megapixel_photo_paints_within_a_second(engine, megapixel_photo, window):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    name = "desktop" if window == DESKTOP else "phone"
    with chromium(*window) as browser, serve_page(engine) as page:
        wait = WebDriverWait(browser, WAIT_S)
        browser.set_script_timeout(WAIT_S)
        browser.get(page)
        ARTIFACTS.mkdir(exist_ok=True)
        try:
            upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image-input input[type=file]")))
            upload.send_keys(str(megapixel_photo))
            wait.until(lambda _: images(browser, "#image-input"))
            browser.find_element(By.CSS_SELECTOR, "#image-prompt textarea").send_keys("person . rocket")
            button = browser.find_element(By.CSS_SELECTOR, "#image-run")
            button.click()
            wait.until(lambda _: images(browser, "#image-output") and images(browser, "#image-masks")
                       and images(browser, "#image-decoder-maps")
                       and "Done in" in browser.find_element(By.CSS_SELECTOR, "#image-progress").text)

            browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
            times, runs = [], []
            for _ in range(CLICKS):
                seconds, whole = browser.execute_async_script(TIME_EXPLAIN_JS, button,
                                                              [f"image-{g}" for g in GALLERIES], WAIT_S * 1000)
                assert seconds >= 0, "the explanation grids never filled"
                status = browser.find_element(By.CSS_SELECTOR, "#image-explain-status").text
                assert "no model ran" in status, f"the explanation was not a cache hit: {status!r}"
                times.append(seconds)
                runs.append(whole)
            (ARTIFACTS / f"explain_speed_{name}.json").write_text(json.dumps({"explain_s": times, "run_s": runs}))
            assert min(times) < PAINT_LIMIT_S, (
                f"explain of a cached 1-megapixel photo painted in {', '.join(f'{t:.2f}' for t in times)} s")
            assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body.error")
        finally:
            shot(browser, f"explain_speed_{name}.png")
