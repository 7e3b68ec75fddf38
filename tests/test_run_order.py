"""An input's change answered after a newer run started leaves that run's panels alone (explain_ui.run_order).

The bookkeeping on its own; the page's counting js in node (when node is installed); and the page's
own change and run-start events over Gradio's HTTP API, on both tabs, with no backend or models (these
events never reach the backend). The same race in a real browser: tests/test_browser_page_state.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from explain_ui.run_order import RunOrder, changed_js, started_js
from tests.ui_servers import free_port


# -- the bookkeeping ------------------------------------------------------------------------------------------
def test_a_change_sent_before_a_newer_run_is_overtaken_on_that_page_and_tab_only():
    order = RunOrder()
    assert not order.overtaken("page", "image", 0)  # no run yet
    order.started("page", "image", 1)
    assert order.overtaken("page", "image", 0)  # sent before run 1 started
    assert not order.overtaken("page", "image", 1)  # sent after it started: it clears (and cancels) run 1
    assert not order.overtaken("page", "task", 0)  # another tab's panels
    assert not order.overtaken("other page", "image", 0)  # another page load
    order.started("page", "image", 3)
    order.started("page", "image", 2)  # run 2's start reached the server after run 3's
    assert order.overtaken("page", "image", 2) and not order.overtaken("page", "image", 3)


def test_events_without_a_page_or_a_count_are_never_overtaken():
    order = RunOrder()
    order.started(None, "image", 5)
    order.started("page", "image", None)
    assert not order.overtaken("page", "image", 0)
    order.started("page", "image", 1.0)  # gr.Number sends what the page's js returned
    assert not order.overtaken(None, "image", 0) and not order.overtaken("page", "image", None)
    assert order.overtaken("page", "image", 0.0)


def test_the_oldest_pages_are_forgotten_past_the_bound():
    order = RunOrder(max_pages=2)
    order.started("a", "image", 1)
    order.started("b", "image", 1)
    order.started("a", "image", 2)  # page a is the newest again
    order.started("c", "image", 1)  # b goes
    assert order.overtaken("a", "image", 1) and order.overtaken("c", "image", 0)
    assert not order.overtaken("b", "image", 0)
    with pytest.raises(ValueError, match="max_pages"):
        RunOrder(max_pages=0)


def test_starts_and_checks_from_many_threads_keep_the_highest_run():
    order = RunOrder()
    runs = iter(range(1, 2001))
    lock = threading.Lock()

    def start_some() -> None:
        for _ in range(500):
            with lock:
                run = next(runs)
            order.started("page", "image", run)
            order.overtaken("page", "image", 0)

    threads = [threading.Thread(target=start_some) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert order.overtaken("page", "image", 1999) and not order.overtaken("page", "image", 2000)


# -- the page's js --------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_page_counts_runs_per_tab_and_changes_send_the_count():
    script = f"""
    globalThis.window = globalThis;
    const started = {{image: {started_js("image", "() => { globalThis.before = (globalThis.before || 0) + 1; }")},
                     task: {started_js("task")}}};
    const changed = {{image: {changed_js("image")}, task: {changed_js("task")}}};
    const seen = [changed.image(null)];
    seen.push(started.image(null), started.image(null), changed.image(null), changed.task(null));
    seen.push(started.task(null), changed.task(null), changed.image(null), globalThis.before);
    console.log(JSON.stringify(seen));
    """
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=30, check=True).stdout
    # change before any run: 0; two image runs: 1, 2; image change after them: 2; task: 0; a task run: 1;
    # the image count stays 2; the scroll (``before``) ran once per image run.
    assert json.loads(out) == [0, 1, 2, 2, 0, 1, 1, 2, 2]


# -- the page's events over Gradio's HTTP API ------------------------------------------------------------------
@dataclass
class Page:
    """The explain page served on a free port, with its events found by the element and event they hang on."""

    url: str
    config: dict[str, Any]

    def event(self, elem_id: str, trigger: str) -> int:
        """The counting event (a run's start, an input's change: the ones with js) on ``elem_id``."""
        ids = {c["props"].get("elem_id"): c["id"] for c in self.config["components"] if c.get("props")}
        found = [d["id"] for d in self.config["dependencies"]
                 if [ids[elem_id], trigger] in map(list, d["targets"]) and d["js"]]
        assert len(found) == 1, f"{len(found)} {trigger} events with js on #{elem_id}"
        return found[0]

    def send(self, elem_id: str, trigger: str, count: int, page: str) -> list[Any]:
        """What the event answers when the page sends ``count`` (its js's value) from page load ``page``."""
        import httpx

        body = {"fn_index": self.event(elem_id, trigger), "data": [count], "session_hash": page}
        answer = httpx.post(f"{self.url}gradio_api/run/predict", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()["data"]


@pytest.fixture(scope="module")
def page() -> Iterator[Page]:
    from explain_ui.app import UISettings, build_demo
    from explain_ui.client import BackendClient

    # No backend: the events under test never call it.
    demo = build_demo(BackendClient(f"http://127.0.0.1:{free_port()}"), UISettings())
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Page(f"http://127.0.0.1:{port}/", demo.config)
    finally:
        demo.close()


def skipped(answer: list[Any]) -> bool:
    """Every output left as it is (gr.skip(): an update with no value and no property; the panels'
    gr.State is kept on the server and always answers None)."""
    def empty(update: Any) -> bool:
        return update is None or isinstance(update, dict) and set(update) <= {"__type__", "props"} and (
            "props" not in update or set(update["props"]) == {"__type__"})

    return bool(answer) and all(empty(update) for update in answer)


def clears(answer: list[Any], note: str) -> bool:
    """The progress line shows ``note`` and the buttons come on."""
    buttons = [u for u in answer if isinstance(u, dict) and "interactive" in u]
    return note in answer and bool(buttons) and all(b["interactive"] is True for b in buttons)


def busy(answer: list[Any]) -> bool:
    """A run's start: the tab's buttons go off."""
    return bool(answer) and all(u == {"interactive": False, "__type__": "update"} for u in answer)


IMAGE_NOTE = "Press Run to segment and explain."
TASK_NOTE = "Inputs changed: press Load or Run."


CHANGES = (("image-input", "change"), ("image-prompt", "change"), ("image-box", "change"), ("image-text", "change"),
           ("task-id", "input"), ("task-project", "input"), ("task-prompt", "input"),
           ("task-use-project", "input"), ("task-box", "input"), ("task-text", "input"))


def test_a_change_stops_the_runs_before_its_clear_is_sent(page):
    """The page sends one trigger's listeners in turn, each once the one before was answered: a cancel
    after the clear would wait for the clear's answer and, were that late, stop a run started after the
    change (tests/test_browser_page_state.py saw it stop at step 1). So the cancel comes first."""
    ids = {c["props"].get("elem_id"): c["id"] for c in page.config["components"] if c.get("props")}
    progress = {tab: ids[f"{tab}-progress"] for tab in ("image", "task")}
    runs = {d["id"]: d for d in page.config["dependencies"]}
    for elem_id, trigger in CHANGES:
        listeners = [d for d in page.config["dependencies"] if [ids[elem_id], trigger] in map(list, d["targets"])]
        cancels = [i for i, d in enumerate(listeners) if d["cancels"]]
        clears = [i for i, d in enumerate(listeners) if d["backend_fn"]]
        assert len(cancels) == 1 and len(clears) == 1, (elem_id, listeners)
        assert cancels[0] < clears[0], f"#{elem_id}: its cancel waits for its clear's answer"
        tab = elem_id.split("-")[0]
        stopped = [runs[i] for i in listeners[cancels[0]]["cancels"]]
        # What it stops: the tab's runs (queued, writing the tab's progress line).
        assert stopped and all(d["queue"] is not False and progress[tab] in d["outputs"] for d in stopped), stopped


def test_image_tab_a_change_overtaken_by_a_run_changes_nothing(page):
    assert clears(page.send("image-prompt", "change", 0, "p1"), IMAGE_NOTE)  # no run yet
    assert busy(page.send("image-run", "click", 1, "p1"))
    late = page.send("image-prompt", "change", 0, "p1")  # sent before run 1, answered after it began
    assert skipped(late), late
    assert skipped(page.send("image-box", "change", 0, "p1"))
    assert clears(page.send("image-prompt", "change", 1, "p1"), IMAGE_NOTE)  # sent after run 1 started
    assert clears(page.send("image-prompt", "change", 0, "p2"), IMAGE_NOTE)  # another page load
    assert clears(page.send("task-id", "input", 0, "p1"), TASK_NOTE)  # the task tab had no run
    page.send("image-prompt", "submit", 2, "p1")  # Enter in the prompt starts a run too
    assert skipped(page.send("image-input", "change", 1, "p1"))


def test_task_tab_a_change_overtaken_by_load_or_run_changes_nothing(page):
    for start, count in (("task-load", 1), ("task-id", 2), ("task-run", 3)):
        trigger = "submit" if start == "task-id" else "click"
        assert busy(page.send(start, trigger, count, "t1"))
        for edited in ("task-id", "task-project", "task-prompt", "task-use-project", "task-box"):
            assert skipped(page.send(edited, "input", count - 1, "t1")), (start, edited)
        settings = page.send("task-text", "input", count, "t1")
        assert clears(settings, "Settings changed: press Run to segment and explain.")
    assert clears(page.send("image-prompt", "change", 0, "t1"), IMAGE_NOTE)  # the image tab had no run
