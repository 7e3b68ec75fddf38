#!/bin/sh
# Container entrypoint.
#   backend     fetch missing model weights once (into the model_cache volume), then serve gunicorn
#   explain-ui  the Gradio explain page (talks to BACKEND_URL)
#   anything else is run as given (e.g. `python -m backend.preannotate --project 3`)
set -eu
cd /app

sync_manifest() {
    # The volume may hold an older image's manifest; this image's is the one that matches its code.
    # (backend.weights reads /app/model_cache/manifest.json whatever MODEL_CACHE_DIR says.)
    if [ -f /opt/manifest.json ] && [ -w /app/model_cache ]; then
        cp /opt/manifest.json /app/model_cache/manifest.json 2>/dev/null || true
    fi
}

case "${1:-backend}" in
    backend)
        sync_manifest
        if ! python -m backend.weights check >/dev/null 2>&1; then
            if [ "${WEIGHTS_DOWNLOAD:-1}" = "1" ]; then
                echo "entrypoint: model weights missing in ${MODEL_CACHE_DIR:-/app/model_cache}; downloading (once, kept in the volume)"
                python -m backend.weights download --no-progress \
                    || echo "entrypoint: download failed; the backend starts and /health says what is missing"
            else
                echo "entrypoint: model weights missing and WEIGHTS_DOWNLOAD=0; /health will say which"
            fi
        fi
        exec gunicorn -c gunicorn.conf.py backend._wsgi:app
        ;;
    explain-ui)
        exec python -m explain_ui
        ;;
    *)
        exec "$@"
        ;;
esac
