#!/usr/bin/env bash
# Install what tests/test_browser.py drives: Debian's chromium + chromedriver (apt, as root). The
# selenium bindings come from requirements.lock (scripts/setup_venv.sh). Idempotent: nothing is done
# when both are already there. Never downloads a browser build of its own (no Selenium Manager).
set -euo pipefail

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
    exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
    echo "install_browser: chromium is missing and installing it needs root (apt-get install chromium chromium-driver)" >&2
    exit 1
fi
echo "install_browser: installing Debian's chromium and chromium-driver"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
/usr/bin/chromium --version
