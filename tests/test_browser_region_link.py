"""The "Why this mask" link of a region, end to end: the backend predicts a real Label Studio task,
the prediction is stored in Label Studio, and the link the backend wrote on region k opens the explain
page in headless Chromium with region k's explanation first, at desktop and phone sizes (issue 13,
item 9). Screenshots: test-artifacts/region_link_*.png.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from tests.browser_page import DESKTOP, PHONE, WAIT_S, busy, chromium, images, serve_page, shot

BRUSH_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
                '<Label value="cat"/><Label value="rocket"/></BrushLabels></View>')


def _block(browser) -> dict | None:
    """The region block's attributes and where it sits in the viewport (None while it is absent)."""
    return browser.execute_script("""
        const block = document.querySelector('#task-region .region-focus');
        if (!block) return null;
        const r = block.getBoundingClientRect();
        const panels = document.querySelector('#task-output').getBoundingClientRect();
        return {mask: block.dataset.mask || null, region: block.dataset.region || null, top: r.top,
                bottom: r.bottom, viewport: window.innerHeight, text: block.innerText,
                images: block.querySelectorAll('img[src^="data:image/"]').length,
                alert: block.getAttribute('role') === 'alert', panels_top: panels.top};""")


def _open(browser, link: str) -> dict:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(link)
    WebDriverWait(browser, WAIT_S).until(lambda _: _block(browser) and images(browser, "#task-output")
                                         and not busy(browser))
    WebDriverWait(browser, 10).until(lambda _: _block(browser)["top"] < _block(browser)["viewport"])  # scrolled
    return _block(browser)


def test_region_link_opens_that_region_first_at_desktop_and_phone_sizes(label_studio, engine, chelsea, tmp_path):
    from backend.engine import Engine
    from backend.engine_holder import EngineHolder
    from backend.ls_api import Credentials
    from backend.ls_model import GroundedSamModel, ModelSettings
    from explain_ui.client import decode_ls_brush
    from tests.ls_server import create_project, import_files

    rgb = np.ascontiguousarray(chelsea[::2, ::2])
    photo = tmp_path / "cat.png"
    Image.fromarray(rgb).save(photo)
    project = create_project(label_studio, BRUSH_CONFIG, title="region link")
    (task_id,) = import_files(label_studio, project, [photo])
    credentials = Credentials(label_studio.url, label_studio.token)
    with serve_page(engine, model=ModelSettings(credentials=credentials)) as page:
        # The backend's own predict, with the page as its EXPLAIN_UI_URL (the page's engine: 2 masks at most).
        quick = Engine(engine.config.replace(max_detections=2), detector=engine.detector, segmenter=engine.segmenter)
        model = GroundedSamModel(EngineHolder(quick), ModelSettings(credentials=credentials,
                                                                    explain_ui_url=page.rstrip("/")))
        task = label_studio.api("GET", f"/api/tasks/{task_id}").json()
        (entry,) = model.predict([task], str(project), BRUSH_CONFIG).results
        results = entry["result"]
        assert len(results) == 2, "the tiny engine must find 2 masks for this test to tell regions apart"
        label_studio.api("POST", "/api/predictions/", expect=(201,),
                         json={"task": task_id, "result": results, "score": entry["score"],
                               "model_version": entry["model_version"]})
        region = results[-1]  # not the first: opening the page at its top proves nothing
        header, link = region["meta"]["text"][0].split("\n")
        assert header == "Why this mask:" and f"region={region['id']}" in link
        # Which mask that is, independently of the page: the engine's masks against the stored RLE.
        masks = [s.mask for s in quick.segment(rgb, ["cat", "rocket"])]
        number = 1 + next(i for i, m in enumerate(masks) if np.array_equal(m, decode_ls_brush(region)))

        for size in (DESKTOP, PHONE):
            with chromium(*size) as browser:
                name = "desktop" if size == DESKTOP else "phone"
                try:
                    block = _open(browser, link)
                    assert (block["mask"], block["region"]) == (str(number), region["id"]), block
                    assert not block["alert"] and f"#{number} " in block["text"]
                    assert block["images"] >= 2  # its cut-out and its decoder map at least
                    assert block["top"] < block["panels_top"]  # before the Input/Output/Explanation panels
                    # In view: on a phone, the page is scrolled to it (not left on the Input form).
                    assert -2 <= block["top"] < block["viewport"], block  # -2: sub-pixel after a scroll
                    selected = browser.execute_script(
                        "return [...document.querySelectorAll('#task-masks figure')]"
                        ".findIndex(f => f.classList.contains('selected') && f.getAttribute('aria-current'))")
                    assert selected == number - 1  # and the mask is marked in the output
                finally:
                    shot(browser, f"region_link_{name}.png")

                if size == DESKTOP:  # a region the task doesn't have: said so, and the task is still shown
                    bad = re.sub(r"region=[^&]*", "region=mask-9", link)
                    try:
                        block = _open(browser, bad)
                        assert block["alert"] and "'mask-9'" in block["text"] and "All masks are shown" in block["text"]
                        assert images(browser, "#task-masks") and images(browser, "#task-decoder-maps")
                    finally:
                        shot(browser, "region_link_unknown.png")
