"""HTTP routes over the job store: what background prediction jobs are doing, and cancelling one.
A thin layer: the store computes progress (``JobStore.progress``), the JSON's one typed definition is
``backend.api_schema``; the routes parse the request and map "no such job" / "already finished" /
"no store" to 404 / 409 / 503.

    GET  /api/jobs                 the most recent jobs, newest first (?project=<id>, ?limit=1..500)
    GET  /api/jobs/<id>            one job: state, done/failed/total, rate, ETA, recent task errors
    POST /api/jobs/<id>/cancel     stop an active job (409 when it has already finished)

Basic auth is the app's (every route). Built per app by ``jobs_blueprint(store)`` so it needs nothing
from ``backend._wsgi`` (no import cycle) and a test can hand it any store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import Conflict, NotFound, ServiceUnavailable

from .api_schema import CancelJson, JobJson, JobListJson
from .errors import BadRequest
from .project_state import project_key

if TYPE_CHECKING:
    from .jobs.store import JobStore

DEFAULT_LIMIT, MAX_LIMIT = 50, 500

NO_STORE = ("this backend has no job store, so it keeps no background jobs: set JOBS_DB (a SQLAlchemy URL, "
            "e.g. sqlite:////data/jobs.sqlite3) or DATA_DIR (jobs.sqlite3 is kept there) and restart it")


def jobs_blueprint(store: JobStore | None) -> Blueprint:
    """The /api/jobs routes over ``store`` (None: every route answers 503 naming JOBS_DB / DATA_DIR).

    Arguments:
        store: the server's job store (``GroundedSamModel.jobs``).
    Returns:
        A Blueprint to register on the app.
    """
    jobs = Blueprint("jobs", __name__, url_prefix="/api/jobs")

    def the_store() -> JobStore:
        if store is None:
            raise ServiceUnavailable(NO_STORE)
        return store

    def progress(job_id: str) -> JobJson:
        found = the_store().progress(job_id)
        if found is None:
            raise NotFound(f"no job {_shown(job_id)} in this backend's job store (ids come from /predict's "
                           "'job' or GET /api/jobs)")
        return found.to_json()

    @jobs.get("", strict_slashes=False)  # /api/jobs/ too
    def list_jobs() -> Response:
        limit = _limit(request.args.get("limit"))
        project = project_key(request.args.get("project"))  # "7.1700000000" (Label Studio's uid) -> "7"
        body: JobListJson = {"jobs": [job.to_json() for job in the_store().list_jobs(project, limit)]}
        return jsonify(body)

    @jobs.get("/<job_id>")
    def get_job(job_id: str) -> Response:
        return jsonify(progress(job_id))

    @jobs.post("/<job_id>/cancel")
    def cancel_job(job_id: str) -> Response:
        cancelled = the_store().cancel(job_id)
        job = progress(job_id)  # 404 for an unknown id
        if not cancelled:
            raise Conflict(f"job {_shown(job_id)} has already finished ({job['state']}: {job['done']} done, "
                           f"{job['failed']} failed of {job['total']}); there is nothing to cancel")
        body: CancelJson = {"cancelled": True, "job": job}
        return jsonify(body)

    return jobs


def _limit(text: str | None) -> int:
    if text is None or not text.strip():
        return DEFAULT_LIMIT
    try:
        limit = int(text)
    except ValueError:
        raise BadRequest(f"'limit' must be a whole number from 1 to {MAX_LIMIT}, got {text[:40]!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"'limit' must be from 1 to {MAX_LIMIT}, got {limit}")
    return limit


def _shown(job_id: str) -> str:
    """The id as a message shows it: quoted, cut short (it comes from the URL)."""
    return repr(job_id if len(job_id) <= 64 else job_id[:64] + "...")
