"""gunicorn settings for `gunicorn backend._wsgi:app` (read from the working directory).

Like label-studio-ml's Dockerfile: PORT, WORKERS, THREADS. One worker by default: each worker
process loads its own copy of the models (GBs), and threads share one copy safely (the engine runs
one encoder pass at a time and keeps per-project state behind locks). No preload: the models are
loaded in each worker after the fork, in the background, so /health answers at once.
"""

import os

from backend.gunicorn_worker import listen_host

# HOST, else 0.0.0.0 with basic auth and 127.0.0.1 without (listen_host says why).
bind = os.getenv("BIND") or f"{listen_host(os.environ)}:{os.getenv('PORT', '9090')}"
workers = int(os.getenv("WORKERS", "1"))
threads = int(os.getenv("THREADS", "8"))
# gthread, except that requests are read in the event loop (a slow or silent client holds no thread)
# and /health, /setup, /metrics have their own threads: see backend/gunicorn_worker.py.
worker_class = "backend.gunicorn_worker.BufferingThreadWorker"
# The gthread main loop keeps notifying while requests run in threads, so this only catches a
# wedged worker; a long batch prediction is not cut short by it.
timeout = int(os.getenv("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 30
keepalive = 5
preload_app = False
accesslog = "-"
errorlog = "-"
loglevel = os.getenv("LOG_LEVEL", "info").lower()


def post_worker_init(worker):  # noqa: ANN001 - gunicorn hook signature
    # Tokens never reach gunicorn's logs either (the app installs the same redaction for its own).
    from backend.ls_api import install_log_redaction

    install_log_redaction()


def when_ready(server):  # gunicorn hook signature
    if bind.startswith("127.0.0.1:") and not os.getenv("HOST") and not os.getenv("BIND"):
        server.log.warning(
            "listening on %s only (no basic auth). To accept other machines (e.g. Label Studio in a container): "
            "set BASIC_AUTH_USER and BASIC_AUTH_PASS (then it listens on 0.0.0.0), or set HOST=0.0.0.0 explicitly",
            bind)
