#!/usr/bin/env bash
# Run the main job: the Label Studio ML backend (gunicorn, port $PORT, default 9090) and the explain
# UI (Gradio, port $EXPLAIN_UI_PORT, default 7860). Installs .venv if needed and fetches any missing
# model weights first. With arguments, runs the engine once instead:
#   scripts/run.sh IMAGE --prompt "cat . dog" [--out overlay.png]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_venv.sh
PY=.venv/bin/python

# Only the weights the configured variants need; a custom ENGINE_CONFIG cache is checked, not fetched.
if ! "$PY" -m backend.weights check >/dev/null 2>&1; then
    "$PY" -m backend.weights download
fi

if [[ $# -gt 0 ]]; then
    exec "$PY" -m backend segment "$@"
fi

# Without basic auth anyone who reaches the port can run the models and borrow our Label Studio key:
# listen on loopback unless auth is set or HOST says otherwise (gunicorn.conf.py applies the same rule).
if [[ -z "${HOST:-}" ]]; then
    if [[ -n "${BASIC_AUTH_USER:-}" && -n "${BASIC_AUTH_PASS:-}" ]]; then
        export HOST=0.0.0.0
    else
        export HOST=127.0.0.1
        echo "run: no BASIC_AUTH_USER/BASIC_AUTH_PASS, so the backend listens on 127.0.0.1 only. To open it up:" \
             "set BASIC_AUTH_USER and BASIC_AUTH_PASS (then it listens on 0.0.0.0), or HOST=0.0.0.0 explicitly." >&2
    fi
fi
export BACKEND_URL="${BACKEND_URL:-http://127.0.0.1:${PORT:-9090}}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
.venv/bin/gunicorn -c gunicorn.conf.py backend._wsgi:app & pids+=($!)
"$PY" -m explain_ui & pids+=($!)
echo "run: backend on http://$HOST:${PORT:-9090} (explain UI uses $BACKEND_URL), explain UI on http://127.0.0.1:${EXPLAIN_UI_PORT:-7860} (Ctrl-C stops both)"
wait -n "${pids[@]}"
