"""Inputs the explain page must answer in a lasting line of the right panel, in headless Chromium at a
small phone's size (320 x 568; screenshots in test-artifacts/):

- a file whose type isn't an image (a PDF picked, a text file dropped) is refused by Gradio in the page
  itself, with a pop-up that fades or, for a drop, nothing at all; the Input panel's error line must
  name the file and why, stay, and go with the next good upload;
- a task ID Label Studio doesn't have is an Input panel error naming the task (the backend answers 404,
  not a 502 "Label Studio failed" shown under Output);
- editing a task field after a "Why this mask" link opened a region takes that region's block away with
  the masks it was about (it stayed above the emptied panels, about another task).

Label Studio is ``tests.test_fetch.FakeLabelStudio`` (its task, project and media endpoints): what is
tested is the page and the backend's routes, not Label Studio; the models are the tiny random ones.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tests.browser_page import WAIT_S, busy, chromium, images, serve_page, shot

SMALL_PHONE = (320, 568)
UI_WAIT_S = 20
BRUSH = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
         '<Label value="cat"/><Label value="rocket"/></BrushLabels></View>')

# The region block's look: absent, or on show (rendered and visible) with its text.
REGION_JS = """
const block = document.querySelector('#task-region .region-focus');
return block && block.offsetParent !== null ? block.innerText : null;
"""
TOASTS_JS = "return [...document.querySelectorAll('.toast-body')].map(t => t.innerText.trim())"
# Drops a file of type arguments[1] named arguments[0] on the Image input's upload area.
DROP_JS = """
const area = document.querySelector('#image-input [aria-label], #image-input button, #image-input');
const data = new DataTransfer();
data.items.add(new File(['just notes'], arguments[0], {type: arguments[1]}));
for (const kind of ['dragenter', 'dragover', 'drop'])
  area.dispatchEvent(new DragEvent(kind, {bubbles: true, cancelable: true, dataTransfer: data}));
"""


def test_refused_files_unknown_tasks_and_a_links_region_after_an_edit(engine, chelsea, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from backend.fetch import FetchSettings
    from backend.ls_api import Credentials
    from backend.ls_model import ModelSettings
    from tests.test_fetch import LEGACY_TOKEN, FakeLabelStudio

    photo = tmp_path / "cat.png"
    Image.fromarray(np.ascontiguousarray(chelsea[::3, ::3])).save(photo)
    pdf = tmp_path / "scan.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(chelsea[::3, ::3])).save(buffer, format="PNG")

    with FakeLabelStudio() as ls, chromium(*SMALL_PHONE) as browser:
        ls.files["/data/upload/1/cat.png"] = buffer.getvalue()
        ls.tasks[1] = {"id": 1, "project": 1, "data": {"image": "/data/upload/1/cat.png"}, "predictions": []}
        ls.projects[1] = {"id": 1, "label_config": BRUSH}
        model = ModelSettings(credentials=Credentials(ls.url, LEGACY_TOKEN), fetch=FetchSettings(timeout=5))
        wait = WebDriverWait(browser, UI_WAIT_S)

        def text(selector: str) -> str:
            found = browser.find_elements(By.CSS_SELECTOR, selector)
            return found[0].text.strip() if found else ""

        with serve_page(engine, model=model) as page:
            try:
                # -- a PDF picked: refused by the page; the Input panel says so, and keeps saying it --
                browser.get(page)
                wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#image-input input[type=file]"))
                browser.find_element(By.CSS_SELECTOR, "#image-input input[type=file]").send_keys(str(pdf))
                wait.until(lambda _: "scan.pdf" in text("#image-input-error"))
                assert "application/pdf" in text("#image-input-error"), text("#image-input-error")
                assert not browser.execute_script(TOASTS_JS), "a pop-up instead of (or beside) the error line"
                # -- a good photo clears it; a text file dropped is named the same way --
                browser.find_element(By.CSS_SELECTOR, "#image-input input[type=file]").send_keys(str(photo))
                wait.until(lambda _: text("#image-input-error") == "")
                browser.execute_script(DROP_JS, "notes.txt", "text/plain")
                wait.until(lambda _: "notes.txt" in text("#image-input-error"))
                assert not browser.execute_script(TOASTS_JS)
                shot(browser, "page_inputs_refused_file.png")

                # -- a "Why this mask" link: its region's block, then an edit of the task ID takes it away --
                browser.get(page + "?task=1&project=1&region=mask-1")
                WebDriverWait(browser, WAIT_S).until(lambda _: browser.execute_script(REGION_JS)
                                                     and images(browser, "#task-output") and not busy(browser))
                field = browser.find_element(By.CSS_SELECTOR, "#task-id textarea, #task-id input")
                field.send_keys("9")  # task 19: one key press, one .input
                wait.until(lambda _: text("#task-progress").startswith("Inputs changed"))
                wait.until(lambda _: browser.execute_script(REGION_JS) is None,
                           "the link's region block stays after the task ID was edited")

                # -- a task Label Studio doesn't have: the Input panel names it, Output has no error --
                browser.find_element(By.CSS_SELECTOR, "#task-load").click()
                wait.until(lambda _: "task 19" in text("#task-input-error"))
                assert text("#task-output-error") == "", text("#task-output-error")
                assert "Task ID" in text("#task-input-error")
            finally:
                shot(browser, "page_inputs_last.png")
