#!/usr/bin/env bash
# Create/refresh .venv-ls (a real Label Studio for the e2e tests) from requirements-label-studio.txt.
# Idempotent: the sha256 of the requirements file is stored in the venv; if it matches,
# label-studio imports and the migrated DB template exists, nothing is done (~0.2 s).
# LS_VENV overrides the venv path, PYTHON the interpreter (default python3.11).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/requirements-label-studio.txt"
VENV="${LS_VENV:-$ROOT/.venv-ls}"
STAMP="$VENV/.requirements.sha256"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

TEMPLATE="$VENV/ls-db-template/label_studio.sqlite3"

# A migrated, empty SQLite DB: tests/ls_server.py copies it into each fresh server dir, which
# saves the ~80 s of Django migrations on every start. Built in a temp dir, moved in when complete.
build_template() {
    echo "install_label_studio: building migrated DB template (Django migrations, ~1-2 min)"
    local tmp
    tmp="$(mktemp -d)"
    if ! env -u PYTHONPATH -u DJANGO_SETTINGS_MODULE \
        LABEL_STUDIO_BASE_DATA_DIR="$tmp" LABEL_STUDIO_DATABASE_NAME="$tmp/label_studio.sqlite3" \
        "$VENV/bin/python" "$("$VENV/bin/python" -c 'import label_studio, os; print(os.path.dirname(label_studio.__file__))')/manage.py" \
        migrate --no-color -v0 >"$tmp/migrate.log" 2>&1; then
        tail -40 "$tmp/migrate.log" >&2
        rm -rf "$tmp"
        echo "install_label_studio: migrating the DB template failed" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$TEMPLATE")"
    mv "$tmp/label_studio.sqlite3" "$TEMPLATE.tmp" && mv "$TEMPLATE.tmp" "$TEMPLATE"
    rm -rf "$tmp"
}

want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/label-studio" ]] \
   && "$VENV/bin/python" -c "import label_studio" >/dev/null 2>&1; then
    if [[ -f "$TEMPLATE" ]]; then
        echo "install_label_studio: $VENV is up to date (requirements sha256 ${want:0:12}); nothing to do"
    else
        build_template
    fi
    exit 0
fi

if [[ -d "$VENV" ]]; then
    echo "install_label_studio: $VENV is missing or stale; recreating it"
    rm -rf "$VENV"
fi
echo "install_label_studio: creating $VENV with $($PYTHON --version 2>&1)"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "install_label_studio: installing $REQ (about 1 GB; takes minutes)"
"$VENV/bin/python" -m pip install --no-input --progress-bar off -r "$REQ"
"$VENV/bin/python" -c "import label_studio; print('install_label_studio: label-studio', label_studio.__version__)"
build_template
# The stamp is written last so an interrupted install is detected as stale next time.
echo "$want" > "$STAMP"
echo "install_label_studio: done"
