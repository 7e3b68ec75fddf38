#!/usr/bin/env bash
# Create/refresh .venv from requirements.lock. Idempotent: the lock's sha256 is stored in the venv,
# so a second run is a no-op and a changed lock rebuilds it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$ROOT/requirements.lock"
VENV="${VENV:-$ROOT/.venv}"
STAMP="$VENV/.requirements.sha256"
PYTHON="${PYTHON:-python3.11}"  # torch 2.14.1 / torchvision 0.29.1 wheels are for CPython 3.11
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

want="$(sha256sum "$LOCK" | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && "$VENV/bin/python" -c "import torch, groundingdino, segment_anything" 2>/dev/null; then
    exit 0
fi
echo "setup_venv: installing $LOCK into $VENV (first time: several minutes)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade "pip==25.3"
# --no-deps: the lock is the complete environment (a full pip freeze), and it leaves out
# openvino-telemetry on purpose (requirements.in); a venv made before that loses it here.
"$VENV/bin/python" -m pip install --no-input --progress-bar off --no-deps -r "$LOCK"
"$VENV/bin/python" -m pip uninstall --yes --quiet openvino-telemetry >/dev/null 2>&1 || true
# The stamp is written last so an interrupted install is detected as stale next time.
echo "$want" > "$STAMP"
echo "setup_venv: done"
