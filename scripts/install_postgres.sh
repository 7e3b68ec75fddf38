#!/usr/bin/env bash
# Install what tests/conftest_pg.py starts: Debian's PostgreSQL server (initdb, pg_ctl; apt, as root).
# The tests start a throwaway cluster of their own (as the package's 'postgres' user when run as root);
# the package's own cluster is not used. Idempotent: nothing is done when initdb is already there.
# The driver (psycopg) comes from requirements.lock (scripts/setup_venv.sh).
set -euo pipefail

if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    echo "install_postgres: PostgreSQL already installed"
    exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
    echo "install_postgres: PostgreSQL is missing and installing it needs root (apt-get install postgresql)" >&2
    exit 1
fi
echo "install_postgres: installing Debian's postgresql"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
compgen -G "/usr/lib/postgresql/*/bin/initdb"
