"""The Jobs tab: background prediction jobs (``GET /api/jobs``) as one progress bar each, as plain
functions of the backend's JSON (typed in ``backend.api_schema``), testable without a browser.

Every number is written out next to its bar (done, failed, left, rate, ETA, state), so nothing is said
by colour alone; the bar is an ARIA ``progressbar`` whose text a screen reader reads. Active jobs get a
Cancel button carrying the job's id (``data-job``), which ``explain_ui/app.py`` wires to
``cancel_job``.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from backend.api_schema import ACTIVE_JOB_STATES, JobJson, TaskErrorJson

from .client import BackendClient, BackendError

REFRESH_S = 2.0  # how often the tab polls while it is on show

# The page's one script for the list: a click on a Cancel button sends its job id to Python (the list
# is re-rendered on every refresh, so the listener sits on the container, not on the buttons).
CANCEL_JS = """
element.addEventListener('click', (event) => {
  const button = event.target.closest('button[data-job]');
  if (button) { button.disabled = true; trigger('click', {job: button.dataset.job}); }
});
"""

CSS = """
.job { border: 1px solid #ccc; border-radius: 6px; padding: 8px 10px; margin: 0 0 10px 0; }
.job-bar { display: flex; height: 18px; background: #e9e9e9; border-radius: 4px; overflow: hidden;
           margin: 6px 0; border: 1px solid #999; }
.job-bar .done { background: #2e7d32; }
.job-bar .failed { background: repeating-linear-gradient(45deg, #c62828 0 4px, #ef9a9a 4px 8px); }
.job-errors { margin: 4px 0 0 1.2em; font-size: 0.9em; }
.job button { margin-top: 4px; padding: 2px 12px; border: 1px solid #888; border-radius: 4px; cursor: pointer; }
"""


@dataclass(frozen=True)
class JobsView:
    """What the Jobs tab shows: the list and a one-line status."""

    html: str
    status: str  # markdown: how many jobs, when refreshed, or why the list is unavailable
    active: int  # jobs still queued or running


def jobs_view(client: BackendClient, project: str | None = None, now: float | None = None) -> JobsView:
    """The backend's jobs (of ``project``), newest first, rendered; a backend failure becomes the
    status line (the tab polls: an error toast every two seconds would drown the page)."""
    project = (project or "").strip()
    try:
        jobs = client.jobs(project or None)["jobs"]
    except BackendError as exc:
        return JobsView(f'<p class="jobs-unavailable">Jobs unavailable: {html.escape(str(exc))}</p>',
                        f"**Jobs unavailable:** {exc}", 0)
    return JobsView(jobs_html(jobs, now), _status(jobs, project), sum(_active(job) for job in jobs))


def cancel_job(client: BackendClient, job_id: str | None) -> str:
    """Cancel a job from its button; returns the message the page shows (the backend's own words when
    it refuses, e.g. the job had already finished). Raises BackendError when the backend fails."""
    if not job_id:
        return "No job given to cancel."
    try:
        job = client.cancel_job(job_id)["job"]
    except BackendError as exc:
        if exc.status in (404, 409):
            return f"Not cancelled: {exc}"
        raise
    return (f"Cancelled job `{_short(job['id'])}` (project {job['project']}): {job['done']} of {job['total']} "
            "tasks were done; the rest will not be predicted.")


def _status(jobs: Sequence[JobJson], project: str) -> str:
    scope = f" for project {project}" if project else ""
    if not jobs:
        return (f"No prediction jobs{scope}. A /predict that reaches PREDICT_DEADLINE_S hands the tasks it "
                "did not reach to one.")
    active = sum(_active(job) for job in jobs)
    return (f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}{scope}, {active} active · "
            f"refreshed {time.strftime('%H:%M:%S')}")


# -- rendering -------------------------------------------------------------------------------------------
def jobs_html(jobs: Sequence[JobJson], now: float | None = None) -> str:
    """Every job as a ``<section class="job">`` with its progress bar, numbers, errors and, while it
    is active, a Cancel button."""
    if not jobs:
        return '<p class="jobs-empty">No prediction jobs yet.</p>'
    now = time.time() if now is None else now
    return '<div class="jobs">' + "".join(job_html(job, now) for job in jobs) + "</div>"


def job_html(job: JobJson, now: float) -> str:
    total, done, failed = job["total"], job["done"], job["failed"]
    finished = done + failed
    percent = 100.0 * finished / total if total else 100.0
    short = _short(job["id"])
    counts = progress_text(job)
    bar = (f'<div class="job-bar" role="progressbar" aria-label="Job {short}, project '
           f'{html.escape(job["project"])}" aria-valuemin="0" aria-valuemax="{total}" aria-valuenow="{finished}" '
           f'aria-valuetext="{html.escape(counts)}">'
           f'<span class="done" style="width:{_width(done, total)}"></span>'
           f'<span class="failed" style="width:{_width(failed, total)}"></span></div>')
    head = (f'<div class="job-head"><b>Project {html.escape(job["project"])}</b> · job <code>{short}</code> · '
            f'<span class="job-state">{html.escape(job["state"])}</span> · {percent:.0f}% · '
            f'created {duration(now - job["created"])} ago · model version '
            f'<code>{html.escape(job["model_version"])}</code></div>')
    parts = [f'<section class="job" data-job="{html.escape(job["id"])}" data-state="{html.escape(job["state"])}">',
             head, bar, f'<div class="job-progress">{html.escape(counts)}</div>']
    if job["error"]:
        parts.append(f'<div class="job-error"><b>Stopped:</b> {html.escape(job["error"])}</div>')
    if job["errors"]:
        items = "".join(f"<li>{html.escape(error_text(e))}</li>" for e in job["errors"])
        parts.append(f'<details class="job-errors-box" open><summary>Recent task errors</summary>'
                     f'<ul class="job-errors">{items}</ul></details>')
    if _active(job):
        parts.append(f'<button type="button" data-job="{html.escape(job["id"])}" '
                     f'aria-label="Cancel job {short} (project {html.escape(job["project"])})">Cancel</button>')
    parts.append("</section>")
    return "".join(parts)


def progress_text(job: JobJson) -> str:
    """``"12 of 40 done, 2 failed, 26 left · 0.50 tasks/s · about 52 s left"``: the bar in words."""
    left = job["pending"] + job["running"]
    text = f"{job['done']} of {job['total']} done, {job['failed']} failed, {left} left"
    rate, eta = job["rate"], job["eta_s"]
    if rate is not None and rate > 0:
        text += f" · {rate:.2f} tasks/s" if rate >= 0.1 else f" · {rate * 60:.1f} tasks/min"
    if _active(job):
        text += f" · about {duration(eta)} left" if eta is not None else " · time left: not known yet"
    return text


def error_text(error: TaskErrorJson) -> str:
    what = "failed" if error["state"] == "failed" else "will be retried"
    return f"task {error['task']} ({what}, {error['attempts']} attempt{'s' if error['attempts'] != 1 else ''}): " \
           f"{error['error']}"


def duration(seconds: float) -> str:
    """``52 s``, ``3 min 20 s``, ``2 h 05 min``."""
    seconds = max(0, math.ceil(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _active(job: JobJson) -> bool:
    return job["state"] in ACTIVE_JOB_STATES


def _width(part: int, total: int) -> str:
    return f"{100.0 * part / total:.2f}%" if total else "0%"


def _short(job_id: str) -> str:
    return html.escape(job_id[:8])
