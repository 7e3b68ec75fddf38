"""The HTTP server Label Studio talks to: label-studio-ml's routes and JSON, on Flask 3.

    gunicorn backend._wsgi:app            # production (settings in gunicorn.conf.py)
    python -m backend._wsgi -p 9090       # development server

Routes (label-studio-ml conventions): GET / and /health, POST /setup, /predict, /webhook, /train,
GET /metrics; the explain UI's JSON API lives under /api (backend/http_api.py).

Environment: BASIC_AUTH_USER / BASIC_AUTH_PASS, LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY, PROMPT,
ALLOWED_IMAGE_HOSTS, MAX_IMAGE_BYTES, IMAGE_FETCH_TIMEOUT, ENGINE_WAIT_S, PREFETCH_TASKS, EXPLAIN_UI_URL, LOG_LEVEL,
RAY_ADDRESS (background jobs on a Ray cluster),
plus the engine's own (ENGINE_CONFIG, MODEL_CACHE_DIR, BOX_THRESHOLD, TEXT_THRESHOLD, ... see backend/config.py).
"""

from __future__ import annotations

import argparse
import hmac
import logging
import logging.config
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .detector import PromptError
from .engine_holder import EngineHolder
from .errors import BadRequest, EngineNotReady, NotFound
from .fetch import FetchError, FetchTimeoutError, ImageDataError, ImageTooLargeError, ImageURLError, URLNotAllowedError
from .images import ImageError
from .json_input import JsonInputError, parse_json
from .label_config import LabelConfigError, TaskDataError
from .ls_api import LabelStudioError, install_log_redaction, register_secret
from .ls_model import GroundedSamModel, ModelSettings
from .project_state import project_key

if TYPE_CHECKING:
    from .jobs.runner import BackgroundRunner
    from .jobs.store import JobStore

logger = logging.getLogger(__name__)

MODEL_CLASS = "GroundedSamModel"
EXTENSION = "grounded_sam"  # app.extensions key holding the GroundedSamModel


@dataclass(frozen=True)
class ServerSettings:
    basic_auth: tuple[str, str] | None = None  # BASIC_AUTH_USER, BASIC_AUTH_PASS
    model: ModelSettings = field(default_factory=ModelSettings)
    engine_config: Any | None = None  # an EngineConfig to load instead of the environment's
    load_on_start: bool = True  # start loading the models when the app is created
    # JOBS_DB (a SQLAlchemy URL) or sqlite:///$DATA_DIR/jobs.sqlite3: background jobs and per-project
    # state shared by every worker; None keeps project state in the process and queues no jobs.
    jobs_db: str | None = None
    # RAY_ADDRESS (auto, local, head:6379, ray://head:10001): the background jobs run on that Ray
    # cluster (backend/jobs/ray_server.py); None runs them in this process.
    ray_address: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerSettings:
        env = os.environ if env is None else env
        user, password = env.get("BASIC_AUTH_USER", ""), env.get("BASIC_AUTH_PASS", "")
        if bool(user) != bool(password):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS to require basic auth, or neither")
        from .jobs.db import default_url

        return cls(basic_auth=(user, password) if user else None, model=ModelSettings.from_env(env),
                   jobs_db=default_url(env), ray_address=env.get("RAY_ADDRESS", "").strip() or None)

    @property
    def max_request_bytes(self) -> int:
        # An image can arrive base64-encoded inside JSON (4/3 larger) next to a few fields.
        return self.model.fetch.max_bytes * 4 // 3 + (1 << 20)


class _InOrderJSON(DefaultJSONProvider):
    """Responses keep their keys in the order the code wrote them (Label Studio's examples do)."""

    sort_keys = False


# -- errors -----------------------------------------------------------------------------------------
def _status_for(exc: BaseException) -> int:
    if isinstance(exc, (BadRequest, JsonInputError, LabelConfigError, PromptError)):
        return 400
    if isinstance(exc, NotFound):  # a task or project id Label Studio doesn't have
        return 404
    if isinstance(exc, URLNotAllowedError):  # a host, credentials or Label Studio path we must not use
        return 403
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, (ImageError, TaskDataError, ImageDataError, ImageURLError)):
        return 422
    if isinstance(exc, FetchTimeoutError):
        return 504
    if isinstance(exc, (LabelStudioError, FetchError)):
        return 502  # Label Studio or the image host failed us; never 401, which would mean *our* auth
    if isinstance(exc, EngineNotReady):
        return 503
    return 500


# Label Studio shows a failed ML request as "<code> Client Error: <reason> for url: <url>" (requests'
# HTTPError text, ml/api_connector.py) in the connect dialog and the labeling stream, and drops the
# body. The reason phrase must be Latin-1 (PEP 3333; requests reads it as such), so non-ASCII is
# escaped, and it is bounded so it fits any proxy's header buffer (nginx: 4 KiB for all headers)
# and reads as one line in Label Studio's dialog.
REASON_MAX_CHARS = 400
REASON_MAX_WORD = 60  # longer runs without spaces (URLs, base64, label lists) are cut in the middle


def _reason(message: str) -> str:
    """``message`` as an HTTP reason phrase: one ASCII line of at most about REASON_MAX_CHARS with
    its start (the cause) and its end (usually what to do) kept; long words and the middle elided.
    Non-ASCII characters become ``\\uXXXX`` escapes, never split by a cut."""
    words = [f"{word[:REASON_MAX_WORD * 2 // 3]}...{word[-REASON_MAX_WORD // 3:]}" if len(word) > REASON_MAX_WORD
             else word for word in message.split()]
    text = " ".join(words)
    whole = "".join(map(_ascii, text))
    if len(whole) <= REASON_MAX_CHARS:
        return whole or "Error"
    # Cut between escaped characters (one unit each), so no "\\uXXXX" is split.
    head = _take(map(_ascii, text), REASON_MAX_CHARS * 3 // 4)
    tail = _take(map(_ascii, reversed(text)), REASON_MAX_CHARS // 4 - 5)[::-1]
    return f"{''.join(head).rstrip()} ... {''.join(tail).lstrip()}"


def _ascii(char: str) -> str:
    code = ord(char)
    if 32 <= code < 127:
        return char
    if code < 160:  # control characters (the message was split on whitespace already)
        return ""
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"  # "猫" -> "\\u732b": decodable


def _take(units: Iterable[str], budget: int) -> list[str]:
    taken: list[str] = []
    for unit in units:
        budget -= len(unit)
        if budget < 0:
            break
        taken.append(unit)
    return taken


def error_response(status: int, message: str, **extra: Any) -> Response:
    response = jsonify({"error": message, **extra})
    response.status = f"{status} {_reason(message)}"
    return response


def _handle_error(exc: Exception) -> Response:
    if isinstance(exc, RequestEntityTooLarge):
        limit = request.max_content_length
        return error_response(413, f"request body is too large: over {limit:,} bytes, the limit for an image of "
                                   "MAX_IMAGE_BYTES sent as base64 JSON" if limit else "request body is too large")
    if isinstance(exc, HTTPException):
        return error_response(exc.code or 500, exc.description or exc.name)
    status = _status_for(exc)
    if status == 500:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")
    logger.warning("%s %s -> %d: %s", request.method, request.path, status, exc)
    return error_response(status, str(exc) or type(exc).__name__)


# -- request parsing --------------------------------------------------------------------------------
def read_body() -> bytes:
    """The request body (cached), 413 when it is over MAX_CONTENT_LENGTH, with or without Content-Length.

    Werkzeug checks Content-Length itself, but a chunked body (no Content-Length) is silently cut at
    the limit; one more byte from the server's stream tells a body of exactly the limit from a longer one.
    """
    data = request.get_data(cache=True)
    limit = request.max_content_length
    if (request.content_length is None and limit is not None and len(data) >= limit
            and "wsgi.input_terminated" in request.environ and request.environ["wsgi.input"].read(1)):
        raise RequestEntityTooLarge()
    return data


def json_body() -> dict[str, Any]:
    """The request's JSON object (whatever the Content-Type says); 400 when it isn't one, 413 when too large."""
    raw = read_body()
    if not raw:
        raise BadRequest("request body must be JSON (it is empty)")
    data = parse_json(raw, "request body")
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(data).__name__}")
    return data


def field_of(data: Mapping[str, Any], name: str, types: type | tuple[type, ...], required: bool = False) -> Any:
    value = data.get(name)
    if value is None:
        if required:
            raise BadRequest(f"'{name}' is required")
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRequest(f"'{name}' has the wrong type: bool")
    if not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise BadRequest(f"'{name}' must be {expected}, got {type(value).__name__}")
    return value


def _json_field(value: Any, name: str) -> Any:
    # A field that may hold JSON as a string (Label Studio sends extra_params as the user typed it).
    return parse_json(value, name) if isinstance(value, str) and value.strip() else value


def current_model() -> GroundedSamModel:
    from flask import current_app

    return current_app.extensions[EXTENSION]


# -- the app ----------------------------------------------------------------------------------------
def create_app(engine: Any | None = None, settings: ServerSettings | None = None) -> Flask:
    """The Flask app. ``engine``: an already loaded Engine (tests); otherwise the engine is loaded
    in the background from ``settings.engine_config`` or the environment."""
    # The /api blueprint imports segment_anything; import it before the engine loader thread starts.
    from .http_api import api
    from .jobs_api import jobs_blueprint

    settings = settings or ServerSettings.from_env()
    install_log_redaction()
    if settings.basic_auth:
        register_secret(settings.basic_auth[1], pin=True)
    if settings.model.credentials is not None:
        register_secret(settings.model.credentials.api_key, pin=True)
    if engine is not None:
        holder = EngineHolder(engine)
    else:
        config = settings.engine_config
        holder = EngineHolder(config_loader=(lambda: config) if config is not None else None)
        if settings.load_on_start:
            holder.start()
    jobs = None
    if settings.jobs_db:
        from .jobs.store import JobStore

        jobs = JobStore(settings.jobs_db)
    model = GroundedSamModel(holder, settings.model, jobs=jobs)
    if jobs is not None:
        # Resumes this store's unfinished jobs; every worker shares them (leases), in-process or on Ray.
        model.start_jobs(_ray_runner(jobs, settings.ray_address) if settings.ray_address else None)
    elif settings.ray_address:
        logger.warning("RAY_ADDRESS is set but there is no job store (JOBS_DB / DATA_DIR): no background jobs")

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json = _InOrderJSON(app)
    app.extensions[EXTENSION] = model
    app.register_error_handler(Exception, _handle_error)

    @app.before_request
    def check_auth() -> Response | None:
        if settings.basic_auth is None:
            return None
        auth = request.authorization
        user, password = settings.basic_auth
        if (auth is not None and auth.type == "basic"
                and hmac.compare_digest((auth.username or "").encode(), user.encode())
                and hmac.compare_digest((auth.password or "").encode(), password.encode())):
            return None
        response = error_response(401, "basic auth required: send BASIC_AUTH_USER / BASIC_AUTH_PASS")
        response.headers["WWW-Authenticate"] = 'Basic realm="Grounded SAM ML backend"'
        return response

    @app.before_request
    def bound_streamed_body() -> None:
        # A chunked body (the server ends the stream, no Content-Length) is read here, so every route
        # (JSON or multipart) sees it whole or answers 413, never a body silently cut at the limit.
        if request.content_length is None and "wsgi.input_terminated" in request.environ:
            read_body()

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        status, reason = holder.status()
        body: dict[str, Any] = {"status": status, "model_class": MODEL_CLASS,
                                "model_version": holder.model_version}
        if holder.engine is not None:
            body["models"] = holder.engine.describe()
        else:
            body["models"] = {}
            if reason:
                body["reason"] = reason
                if holder.problems:
                    body["problems"] = holder.problems
        # Tasks whose prediction failed since start (details: /metrics, the response's "errors", the log).
        body["failed_tasks"] = model.stats.failed_tasks
        if model.runner is not None and model.runner.problem:  # e.g. RAY_ADDRESS unreachable
            body["jobs_problem"] = model.runner.problem
        # Always 200: Label Studio only checks that the backend answers, and shows the body.
        return jsonify(body)

    @app.get("/metrics")
    def metrics() -> Response:
        return jsonify({"predictions": model.stats.snapshot()})

    @app.post("/setup")
    def setup() -> Response:
        data = json_body()
        version = model.setup(
            project=field_of(data, "project", (str, int)),
            schema=field_of(data, "schema", str),
            hostname=field_of(data, "hostname", str),
            access_token=field_of(data, "access_token", str),
            extra_params=_json_field(field_of(data, "extra_params", (dict, str)), "extra_params"),
        )
        return jsonify({"model_version": version})

    @app.post("/predict")
    def predict() -> Response:
        data = json_body()
        tasks = field_of(data, "tasks", list, required=True)
        for i, task in enumerate(tasks):
            if not isinstance(task, dict):
                raise BadRequest(f"tasks[{i}] must be a task object, got {type(task).__name__}")
        params = field_of(data, "params", dict) or {}
        outcome = model.predict(
            tasks,
            project=field_of(data, "project", (str, int)),
            label_config=field_of(data, "label_config", str),
            context=params.get("context"),
        )
        body: dict[str, Any] = {"results": outcome.results, "model_version": model.model_version}
        if outcome.errors:
            body["errors"] = outcome.errors  # Label Studio ignores it; for people reading responses
        if outcome.job_id:  # tasks not reached before PREDICT_DEADLINE_S: a background job writes them
            body["job"] = {"id": outcome.job_id, "tasks": outcome.queued, "progress": f"/api/jobs/{outcome.job_id}"}
        if outcome.dropped_phrases:  # typed phrases no label matches: not detected
            body["dropped_phrases"] = outcome.dropped_phrases
        return jsonify(body)

    @app.post("/webhook")
    def webhook() -> Response:
        data = json_body()
        action = field_of(data, "action", str, required=True)
        return jsonify(model.webhook(action, data))

    @app.post("/train")
    def train() -> Response:
        try:  # Label Studio's training request, if any: only its project is logged
            project = project_key(json_body().get("project"))
        except (BadRequest, JsonInputError):
            project = None
        logger.info("train requested for project %s: nothing to do (zero-shot model)", project)
        return jsonify({"status": "ok", "job": None,
                        "detail": "Grounded SAM is zero-shot: training is a no-op"})

    app.register_blueprint(api)
    app.register_blueprint(jobs_blueprint(jobs))  # /api/jobs: progress and cancel (backend/jobs_api.py)
    return app


def _ray_runner(jobs: JobStore, address: str) -> BackgroundRunner:
    from .jobs.ray_server import RayJobRunner  # imports Ray only when RAY_ADDRESS is set

    return RayJobRunner(jobs, address)


# -- logging, the module-level app, the dev server ----------------------------------------------------
def configure_logging(level: str | None = None) -> None:
    """label-studio-ml's log format, on stdout, at LOG_LEVEL (default INFO); tokens redacted."""
    level = (level or os.getenv("LOG_LEVEL") or "INFO").upper()
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"standard": {
            "format": "[%(asctime)s] [%(levelname)s] [%(name)s::%(funcName)s::%(lineno)d] %(message)s"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout",
                                 "formatter": "standard"}},
        "root": {"level": level, "handlers": ["console"]},
    })
    install_log_redaction()


_app: Flask | None = None
_app_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    # `gunicorn backend._wsgi:app` reads this attribute; building the app on first access keeps
    # `import backend._wsgi` (tests, tools) from loading models.
    if name != "app":
        raise AttributeError(name)
    global _app
    with _app_lock:
        if _app is None:
            configure_logging()
            _app = create_app()
        return _app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Grounded SAM ML backend for Label Studio (dev server)")
    parser.add_argument("-p", "--port", type=int, default=int(os.getenv("PORT", "9090")), help="server port")
    from .gunicorn_worker import listen_host

    parser.add_argument("--host", default=listen_host(os.environ),
                        help="server host (default: HOST, else 0.0.0.0 with basic auth, 127.0.0.1 without)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None)
    parser.add_argument("-d", "--debug", action="store_true", help="Flask debug mode (no reloader)")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    app = create_app()
    app.run(host=args.host, port=args.port, debug=args.debug, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
