#!/usr/bin/env bash
# The one command that runs the whole test suite: makes sure PostgreSQL and RabbitMQ run locally
# (installing them when missing) and that Chromium and playwright-core are there for the ops
# page's browser test, then runs every test of the workspace. Extra arguments go to
# cargo test. Honours CARGO (the cargo to use) and the services' DATABASE_URL / AMQP_URL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CARGO="${CARGO:-cargo}"
export RUST_BACKTRACE=1

echo "scripts/test.sh: ensuring PostgreSQL and RabbitMQ (scripts/ensure-services.sh), Chromium and playwright-core for the ops page test (scripts/ensure-browser.sh), then: $CARGO test --workspace --all-targets${*:+ $*}"

bash "$ROOT/scripts/ensure-services.sh"
bash "$ROOT/scripts/ensure-browser.sh"

status=0
"$CARGO" test --workspace --all-targets "$@" || status=$?
if [ "$status" -ne 0 ]; then
    echo "scripts/test.sh: cargo test failed (exit code $status)" >&2
fi
exit "$status"
