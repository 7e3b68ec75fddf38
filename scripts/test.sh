#!/usr/bin/env bash
# The whole test suite from a clean machine: installs what it needs from the repo's own files
# (requirements.lock for the project, requirements-label-studio.txt for the real Label Studio the
# end-to-end tests drive, Debian's chromium for the browser test, Debian's postgresql for the job
# store's tests), runs the lint and type gate
# (scripts/lint.sh: ruff and mypy; a finding fails the run), then runs pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k engine
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup_venv.sh
# Lint first: it needs only .venv and fails in about a minute, before the long installs and tests.
bash scripts/lint.sh
bash scripts/install_label_studio.sh
if [[ -f scripts/install_browser.sh ]]; then
    bash scripts/install_browser.sh
fi
bash scripts/install_postgres.sh

# Tests that need Label Studio, the browser, PostgreSQL or docker-compose fail (rather than skip) when they are
# missing here (scripts/validate_compose.sh installs Debian's docker-compose when it can).
export REQUIRE_LABEL_STUDIO="${REQUIRE_LABEL_STUDIO:-1}" REQUIRE_BROWSER="${REQUIRE_BROWSER:-1}"
export REQUIRE_DOCKER_COMPOSE="${REQUIRE_DOCKER_COMPOSE:-1}" REQUIRE_POSTGRES="${REQUIRE_POSTGRES:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p test-artifacts
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
