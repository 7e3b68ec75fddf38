#!/usr/bin/env bash
# The lint and type gate (scripts/test.sh runs it before pytest; a finding fails the run):
# ruff (pyflakes, pycodestyle, bugbear incl. zip(strict=), import order, pyupgrade) on the whole
# checkout, then mypy on backend/ and explain_ui/. Settings are in pyproject.toml.
# `.venv/bin/ruff check --fix .` applies ruff's automatic fixes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"  # the same override as scripts/setup_venv.sh

# Both run, so one pass shows every finding; either failing fails the gate.
status=0
"$VENV/bin/ruff" check --no-cache . || status=1
"$VENV/bin/mypy" || status=1
exit "$status"
