"""A real browser on the explain page: Debian's headless Chromium driven by selenium.

The backend app (tiny random-weight engine) and the Gradio page both run in this process on free
ports; Chromium uploads a scikit-image photo, types a prompt and runs: the masks and then the
explanation's maps must fill. A screenshot is kept in test-artifacts/explain_ui.png.
Skipped when chromium/chromedriver/selenium are missing, unless REQUIRE_BROWSER=1 (then it fails).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from PIL import Image

from backend.heatmaps import MAP_SIDE
from backend.images import working_size
from tests.browser_page import ARTIFACTS, WAIT_S, busy, chromium, images, late_change_then_run, serve_page, shot


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium() as driver:
        yield driver


def test_upload_run_and_explain_in_chromium(browser, engine, chelsea, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "chelsea.png"
    Image.fromarray(chelsea).save(photo)
    wait = WebDriverWait(browser, WAIT_S)

    with serve_page(engine) as page:
        browser.get(page)
        try:
            upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image-input input[type=file]")))
            upload.send_keys(str(photo))
            wait.until(lambda _: images(browser, "#image-input"))
            browser.find_element(By.CSS_SELECTOR, "#image-prompt textarea").send_keys("cat . rocket")
            browser.find_element(By.CSS_SELECTOR, "#image-run").click()  # segments, then explains at once

            wait.until(lambda _: images(browser, "#image-output") and images(browser, "#image-masks"))
            masks = images(browser, "#image-masks")
            assert len(masks) >= 1
            assert "mask" in browser.find_element(By.CSS_SELECTOR, "#image-summary").text

            wait.until(lambda _: images(browser, "#image-encoder-heatmaps") and images(browser, "#image-decoder-maps")
                       and not busy(browser))
            heatmaps = images(browser, "#image-encoder-heatmaps")
            assert len(heatmaps) == len(engine.config.sam_arch["encoder_global_attn_indexes"])
            assert len(images(browser, "#image-encoder-overlays")) == len(heatmaps)
            assert len(images(browser, "#image-decoder-maps")) >= 2
            grounding = browser.find_elements(By.CSS_SELECTOR, "#image-grounding .grounding-mask")
            assert len(grounding) == len(masks)
            legend = browser.find_element(By.CSS_SELECTOR, "#image-legend").get_attribute("innerHTML")
            assert "linear-gradient" in legend
            # The heatmap as the browser decoded it has the photo's shape at the maps' working size.
            natural = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]",
                                             heatmaps[0])
            height, width = working_size(chelsea.shape[:2], MAP_SIDE)
            assert natural == [width, height]
            assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body.error")
        finally:
            shot(browser, "explain_ui.png")
    assert (ARTIFACTS / "explain_ui.png").stat().st_size > 10_000


BRUSH_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
                '<Label value="cat"/><Label value="rocket"/></BrushLabels></View>')


def cat_task_link(label_studio, rgb, tmp_path, title: str) -> tuple[int, str, object]:
    """A new brush project on the real Label Studio with ``rgb`` as its one task: the task's id, the
    page's deep-link query for it (``?task=ID&project=P``) and the backend's settings to read it."""
    from backend.ls_api import Credentials
    from backend.ls_model import ModelSettings
    from tests.ls_server import create_project, import_files

    photo = tmp_path / "cat.png"
    Image.fromarray(rgb).save(photo)
    project = create_project(label_studio, BRUSH_CONFIG, title=title)
    (task_id,) = import_files(label_studio, project, [photo])
    settings = ModelSettings(credentials=Credentials(label_studio.url, label_studio.token))
    return task_id, f"?task={task_id}&project={project}", settings


def test_deep_link_opens_and_explains_a_label_studio_task(browser, label_studio, engine, chelsea, tmp_path):
    """``/?task=ID&project=P`` (the link the backend puts on each predicted region) opens the task tab,
    shows the task's image from a real Label Studio and explains it on load. Then the task tab's edits:
    one made just before Run but answered after the run began leaves the run alone; one after it
    clears the panels."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    task_id, link, settings = cat_task_link(label_studio, chelsea[::2, ::2], tmp_path, "deep link")
    wait = WebDriverWait(browser, WAIT_S)
    with serve_page(engine, model=settings) as page:
        browser.get(page + link)
        try:
            # Filled, and no output left spinning (switching tabs must not orphan the loading event).
            wait.until(lambda _: images(browser, "#task-encoder-heatmaps") and images(browser, "#task-output")
                       and not busy(browser))
            assert browser.find_element(By.CSS_SELECTOR, "#task-id textarea, #task-id input").get_attribute(
                "value") == str(task_id)
            assert f"Task {task_id}" in browser.find_element(By.CSS_SELECTOR, "#task-summary").text
            assert images(browser, "#task-decoder-maps") and images(browser, "#task-masks")
            natural = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]",
                                             images(browser, "#task-encoder-heatmaps")[0])
            height, width = working_size(chelsea[::2, ::2].shape[:2], MAP_SIDE)
            assert natural == [width, height]

            prompt = browser.find_element(By.CSS_SELECTOR, "#task-prompt textarea")
            # One key press: one .input event (the prompt was empty: the project's labels).
            race = late_change_then_run(browser, "task", "task-prompt", "input", lambda: prompt.send_keys("c"), WAIT_S)
            assert race.step_only(), f"the late edit's answer changed the progress line mid-run: {race.lines}"
            assert race.busy_throughout(), f"the Run button came on mid-run: {race.lines}"
            assert race.answered_mid_run(), race.held
            wait.until(lambda _: browser.find_element(By.CSS_SELECTOR, "#task-progress").text.startswith("Done")
                       and not busy(browser))
            assert images(browser, "#task-output") and browser.find_element(By.CSS_SELECTOR, "#task-run").is_enabled()

            prompt.send_keys("a")  # an edit after the run clears
            wait.until(lambda _: browser.find_element(By.CSS_SELECTOR, "#task-progress").text.startswith(
                "Inputs changed"))
            assert not images(browser, "#task-output") and not images(browser, "#task-encoder-heatmaps")
        finally:
            shot(browser, "explain_ui_task.png")


def test_edit_during_the_deep_links_run_stops_it(browser, label_studio, engine, chelsea, tmp_path):
    """An edit of a task field while the deep link's own run (load, then explain) is going stops that
    run, as it stops Load's and Run's: the panels stay cleared for the new input, and the run's later
    steps never fill them with what the old input gave."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, link, settings = cat_task_link(label_studio, chelsea[::2, ::2], tmp_path, "deep link edited")
    wait = WebDriverWait(browser, WAIT_S)
    slow_s = 6.0
    with serve_page(engine, slow_explain_s=slow_s, model=settings) as page:
        browser.get(page + link)

        def progress() -> str:  # looked up each time: switching tabs re-renders the line
            found = browser.find_elements(By.CSS_SELECTOR, "#task-progress")
            return found[0].text if found else ""

        try:
            wait.until(lambda _: progress().startswith("Step 2"))  # explaining: slow_s to go
            browser.find_element(By.CSS_SELECTOR, "#task-prompt textarea").send_keys("c")
            wait.until(lambda _: progress().startswith("Inputs changed") and not busy(browser))
            time.sleep(slow_s + 3)  # past the moment the old run's explanation would have come back
            assert progress().startswith("Inputs changed"), progress()
            assert not images(browser, "#task-output") and not images(browser, "#task-encoder-heatmaps")
            assert browser.find_element(By.CSS_SELECTOR, "#task-run").is_enabled()
        finally:
            shot(browser, "explain_ui_task_link_edited.png")


def test_jobs_tab_refreshes_its_progress_bars_and_cancels_in_chromium(browser, tmp_path):
    """The Jobs tab shows a job of a real store as a progress bar, follows its progress on its own
    (gr.Timer) and its Cancel button cancels the job in the store."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from backend.jobs.store import JobStore

    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    wait = WebDriverWait(browser, 30)

    def bar() -> dict:
        return browser.execute_script(
            "const b = document.querySelector('#jobs-list section.job [role=progressbar]');"
            "return b && {now: b.getAttribute('aria-valuenow'), text: b.getAttribute('aria-valuetext')};")

    with serve_page(None, jobs_db=url) as page:  # its job runner is stopped: only the test moves jobs
        store = JobStore(url)
        tasks = [{"id": i, "data": {"image": f"/data/{i}.png"}} for i in range(1, 11)]
        job_id = store.create_job("4", "v1", tasks).job_id
        claimed = [t.task_id for t in store.claim_tasks(job_id, 6, "test")]
        store.mark_done(job_id, claimed[:2])
        store.mark_failed(job_id, claimed[2], "image host answered 404", retryable=False, worker_id="test")
        browser.get(page)
        try:
            tab = wait.until(lambda _: [b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                                        if b.text.strip() == "Jobs"])
            tab[0].click()
            wait.until(lambda _: bar() and bar()["now"] == "3")
            assert bar()["text"].startswith("2 of 10 done, 1 failed, 7 left")
            text = browser.find_element(By.CSS_SELECTOR, "#jobs-list section.job").text
            assert "image host answered 404" in text and "Project 4" in text and "running" in text

            store.mark_done(job_id, claimed[3:6])  # the page follows without a click
            wait.until(lambda _: bar()["now"] == "6")

            browser.find_element(By.CSS_SELECTOR, f"#jobs-list button[data-job='{job_id}']").click()
            wait.until(lambda _: "Cancelled job" in browser.find_element(By.CSS_SELECTOR, "#jobs-message").text)
            assert store.job_state(job_id) == "cancelled"
            wait.until(lambda _: browser.find_element(By.CSS_SELECTOR, "#jobs-list section.job")
                       .get_attribute("data-state") == "cancelled")
            assert not browser.find_elements(By.CSS_SELECTOR, "#jobs-list button[data-job]")
            assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body.error")
        finally:
            shot(browser, "explain_ui_jobs.png")
            store.close()
