#!/usr/bin/env bash
# Validate docker-compose.yml without a Docker engine: `docker-compose config` (Debian's
# docker-compose 1.29 package, installed with apt if missing) parses the file, checks it against the
# Compose schema and resolves variables. Run with placeholder secrets, and once without them to check
# that a missing secret stops `up` with a message naming it.
# Usage: scripts/validate_compose.sh [compose file]   (exit 0: valid)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FILE="${1:-$ROOT/docker-compose.yml}"

if ! command -v docker-compose >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "validate_compose: installing docker-compose (Debian package)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
    else
        echo "validate_compose: docker-compose is not installed (apt-get install docker-compose, as root)" >&2
        exit 127
    fi
fi

# An empty env file: a developer's .env must not change the outcome.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
: > "$work/empty.env"
compose() {
    # No Docker engine: docker-compose config never contacts one, but DOCKER_HOST must not point anywhere.
    env -u DOCKER_HOST -u COMPOSE_FILE -u COMPOSE_PROFILES "$@"
}
secrets=(LABEL_STUDIO_PASSWORD=placeholder-password LABEL_STUDIO_API_KEY=0123456789abcdef0123456789abcdef01234567
         BASIC_AUTH_PASS=placeholder-ml-password)

dc=(docker-compose --env-file "$work/empty.env" -f "$FILE")
compose "${secrets[@]}" "${dc[@]}" config -q
compose "${secrets[@]}" "${dc[@]}" --profile gpu --profile replicas --profile ray config > "$work/resolved.yml"
# Every build context and Dockerfile the resolved file names must exist.
while read -r context; do
    [[ -d "$context" ]] || { echo "validate_compose: build context $context does not exist" >&2; exit 1; }
    last_context="$context"
done < <(sed -n 's/^ *context: *//p' "$work/resolved.yml")
while read -r dockerfile; do
    [[ -f "$last_context/$dockerfile" ]] || { echo "validate_compose: $dockerfile not found in $last_context" >&2; exit 1; }
done < <(sed -n 's/^ *dockerfile: *//p' "$work/resolved.yml")
# Without the secrets, config must refuse and say which variable is missing.
if out="$(compose "${dc[@]}" config -q 2>&1)"; then
    echo "validate_compose: $FILE accepted missing secrets (expected a required-variable error)" >&2
    exit 1
fi
if ! grep -q "BASIC_AUTH_PASS\|LABEL_STUDIO_API_KEY\|LABEL_STUDIO_PASSWORD" <<<"$out"; then
    echo "validate_compose: unexpected error without secrets:" >&2
    echo "$out" >&2
    exit 1
fi
echo "validate_compose: $FILE is valid ($(docker-compose version --short))"
