#!/usr/bin/env bash
# Makes sure the ops page's browser test (gateway/tests/ops_page.rs) has what it needs:
#   - Debian's Chromium at /usr/bin/chromium (package chromium), installed with apt-get when
#     missing (apt-get update first; through sudo when not root)
#   - Node.js and npm (Debian's nodejs and npm packages when missing)
#   - gateway/tests/ops/node_modules: `npm ci` from the committed package-lock.json when missing
# Harmless and quick when everything is there. Playwright never downloads a browser of its own:
# the test uses playwright-core with Debian's Chromium.
#
# Environment:
#   CHROMIUM_PATH   the Chromium binary to use (default /usr/bin/chromium); when it is set and
#                   exists, nothing is installed for it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPS_TEST_DIR="$ROOT/gateway/tests/ops"
CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"
# npm ci of one small package; bounded so a stuck registry cannot hang the test suite.
NPM_CI_TIMEOUT_SECONDS=600

log() { printf 'ensure-browser: %s\n' "$*"; }
die() {
    printf 'ensure-browser: error: %s\n' "$*" >&2
    exit 1
}

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* by hand"
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root apt-get update -q >/dev/null
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

if [ -x "$CHROMIUM_PATH" ]; then
    log "Chromium present at $CHROMIUM_PATH"
else
    [ "$CHROMIUM_PATH" = /usr/bin/chromium ] || die "CHROMIUM_PATH=$CHROMIUM_PATH does not exist"
    log "Chromium: not installed, installing Debian's chromium package"
    apt_install chromium >/dev/null
    [ -x /usr/bin/chromium ] || die "the chromium package did not provide /usr/bin/chromium"
    log "Chromium installed: $(/usr/bin/chromium --version 2>/dev/null || echo unknown version)"
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "Node.js: not installed, installing Debian's nodejs and npm packages"
    apt_install nodejs npm >/dev/null
fi

if [ -d "$OPS_TEST_DIR/node_modules/playwright-core" ]; then
    log "playwright-core present in gateway/tests/ops/node_modules"
else
    log "playwright-core: running npm ci in gateway/tests/ops"
    (
        cd "$OPS_TEST_DIR"
        # No browser download: playwright-core has none, and this says so for good measure.
        PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 timeout "$NPM_CI_TIMEOUT_SECONDS" \
            npm ci --no-audit --no-fund --loglevel=error
    ) || die "npm ci in gateway/tests/ops failed"
    log "playwright-core installed"
fi
