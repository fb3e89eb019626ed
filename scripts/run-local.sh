#!/usr/bin/env bash
# The one command that runs the whole system locally: makes sure PostgreSQL and RabbitMQ run,
# builds the release binaries, then runs the treasury, two workers and the gateway in the
# background with their logs in .run/logs/. Ctrl-C (or SIGTERM) stops them all.
#
# DATABASE_URL, AMQP_URL, HTTP_ADDR, JWT_SECRET, FRONTEND_URL, PARTITIONS (and every other
# variable the services read) pass through to the processes. Honours CARGO and CARGO_TARGET_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CARGO="${CARGO:-cargo}"
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
LOG_DIR="$ROOT/.run/logs"
HEALTH_WAIT_SECONDS=60

bash "$ROOT/scripts/ensure-services.sh"

# The whole workspace, as the benchmark's and the test suite's builds do: building only some
# packages resolves their dependencies' features differently, so every switch between the two
# would recompile the shared dependencies.
echo "Building: $CARGO build --release --workspace"
"$CARGO" build --release --workspace

if [ -z "${JWT_SECRET:-}" ]; then
    JWT_SECRET="$(head -c 32 /dev/urandom | base64)"
    echo "JWT_SECRET is not set: generated a random one for this run (tokens stop working after a restart)"
fi
export JWT_SECRET

export HTTP_ADDR="${HTTP_ADDR:-0.0.0.0:8080}"
PORT="${HTTP_ADDR##*:}"

mkdir -p "$LOG_DIR"

PIDS=()
NAMES=()

# start NAME COMMAND...: runs COMMAND in the background with its output in .run/logs/NAME.log.
start() {
    local name="$1"
    shift
    "$@" >"$LOG_DIR/$name.log" 2>&1 &
    PIDS+=("$!")
    NAMES+=("$name")
    echo "started $name (pid $!), log: .run/logs/$name.log"
}

name_of() {
    local i
    for i in "${!PIDS[@]}"; do
        if [ "${PIDS[$i]}" = "$1" ]; then
            echo "${NAMES[$i]}"
            return
        fi
    done
    echo "pid $1"
}

STOPPING=0
stop_all() {
    [ "$STOPPING" -eq 1 ] && return
    STOPPING=1
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}

# shellcheck disable=SC2317 # called from the traps below
on_signal() {
    echo
    echo "Stopping: sending SIGTERM to ${NAMES[*]} and waiting for them"
    stop_all
    echo "All stopped."
    exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
# On any other exit (an error, a failed health check) no child is left behind.
trap 'stop_all' EXIT

start treasury "$BIN_DIR/treasury"
start worker-1 env WORKER_ID=worker-1 "$BIN_DIR/worker"
start worker-2 env WORKER_ID=worker-2 "$BIN_DIR/worker"
start gateway "$BIN_DIR/gateway"
GATEWAY_PID="${PIDS[-1]}"

echo "Waiting for http://127.0.0.1:$PORT/health (up to ${HEALTH_WAIT_SECONDS}s)"
healthy=0
for ((i = 0; i < HEALTH_WAIT_SECONDS; i++)); do
    if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$PORT/health" 2>/dev/null; then
        healthy=1
        break
    fi
    if ! kill -0 "$GATEWAY_PID" 2>/dev/null; then
        break
    fi
    sleep 1
done
if [ "$healthy" -ne 1 ]; then
    echo "The gateway did not become healthy on http://127.0.0.1:$PORT/health. Last lines of .run/logs/gateway.log:" >&2
    tail -n 40 "$LOG_DIR/gateway.log" >&2 || true
    exit 1
fi

cat <<EOF

The wallet is running.
  Gateway:                  http://127.0.0.1:$PORT  (listening on $HTTP_ADDR)
  RabbitMQ management UI:   http://127.0.0.1:15672  (guest / guest)
  Logs:                     .run/logs/{treasury,worker-1,worker-2,gateway}.log
Press Ctrl-C to stop everything.
EOF

# Wait for the processes. If one exits on its own, the system is incomplete: say which one, show
# the end of its log, stop the others and exit with an error.
exited_pid=""
status=0
wait -n -p exited_pid "${PIDS[@]}" || status=$?
name="$(name_of "$exited_pid")"
echo "$name exited on its own (exit code $status). Last lines of .run/logs/$name.log:" >&2
tail -n 40 "$LOG_DIR/$name.log" >&2 || true
echo "Stopping the others." >&2
stop_all
exit 1
