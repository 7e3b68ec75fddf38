"""Which event a page sent first: an input's change or a run's start.

An input's change clears a tab's Output and Explanation panels and turns its buttons on. Typing and
pressing Run at once sends the change first, but the page's requests travel apart (each one its own
HTTP request, answered by its own thread), so under load the change can be answered after the run
began: it would blank the run's progress line and masks and turn its buttons on mid-run (and its
cancel, were it sent after that answer, would stop the run: ``app.build_demo``'s ``on_change`` sends
the cancel first). So the page numbers its runs: each run's start counts one more on that browser
tab's page (``STARTED_JS``), each change carries the count it was sent after (``CHANGED_JS``), and the
server, told of each start (``RunOrder.started``), leaves out a change a newer run overtook
(``RunOrder.overtaken``).

The count lives in the page (``window.explainRuns``), not on the server, because only the page knows
which of the two it sent first. A change the server answered before it heard of the run is older than
that run's first step, which waits for the start's answer, a queue round trip and a step of its own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

# A run on a tab counts one more on its page; the count is the event's one input (a hidden number).
STARTED_JS = ("(count) => {{ ({before})(); const runs = (window.explainRuns ??= {{}});"
              " runs['{tab}'] = (runs['{tab}'] || 0) + 1; return runs['{tab}']; }}")
# A change carries the count of runs its tab's page had started when it was sent.
CHANGED_JS = "(count) => (window.explainRuns || {{}})['{tab}'] || 0"


def started_js(tab: str, before: str = "() => {}") -> str:
    """The js of a run's first event on ``tab``: runs ``before`` (a js function of no arguments, e.g.
    scrolling the progress line into view), then counts the run and sends its number."""
    return STARTED_JS.format(tab=tab, before=before)


def changed_js(tab: str) -> str:
    """The js of an input's change on ``tab``: sends the number of runs started there so far."""
    return CHANGED_JS.format(tab=tab)


class RunOrder:
    """The newest run each page (Gradio's session hash: one per page load) started on each tab.

    Thread-safe: Gradio answers a page's unqueued events on worker threads, side by side. Pages that
    went away are never told of: the oldest are forgotten past ``max_pages`` (a forgotten page's late
    change is answered as if no run overtook it, as before this guard).

    Arguments:
        max_pages: how many pages to remember (a few dozen bytes each).
    """

    def __init__(self, max_pages: int = 10_000) -> None:
        if max_pages < 1:
            raise ValueError(f"max_pages must be at least 1, got {max_pages}")
        self._max_pages = max_pages
        self._newest: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._lock = threading.Lock()

    def started(self, page: str | None, tab: str, run: int | float | None) -> None:
        """Run number ``run`` started on ``tab`` of ``page`` (a page's starts may reach us out of order:
        the highest number is kept). Without a page or a number (an API caller) nothing is kept."""
        if page is None or run is None:
            return
        key = (page, tab)
        with self._lock:
            self._newest[key] = max(int(run), self._newest.get(key, 0))
            self._newest.move_to_end(key)
            while len(self._newest) > self._max_pages:
                self._newest.popitem(last=False)

    def overtaken(self, page: str | None, tab: str, runs_before: int | float | None) -> bool:
        """Whether a run started on ``tab`` of ``page`` after an event sent when ``runs_before`` runs
        had started there: that event's answer is older than what the run shows and must not change it.
        An event without a page or a count is never overtaken (nothing to compare)."""
        if page is None or runs_before is None:
            return False
        with self._lock:
            return self._newest.get((page, tab), 0) > int(runs_before)
