#!/usr/bin/env bash
# Makes sure the local services the wallet needs are there and running:
#   - PostgreSQL on 127.0.0.1:5432 (user postgres, no password over loopback)
#   - RabbitMQ on 127.0.0.1:5672 (guest/guest), with the management UI on 15672
#   - a C toolchain and pkg-config for the Rust build
# Installs from Debian's packages when something is missing and starts what is stopped. When a
# service already runs it changes nothing (apart from enabling RabbitMQ's management plugin).
#
# Environment:
#   DATABASE_URL / AMQP_URL   when set to a non-loopback host, that service is not managed here.
#   WALLET_CONFIGURE_PG_TRUST=1
#                             allow adding "trust" lines for user postgres over loopback to an
#                             existing local cluster's pg_hba.conf when a password-less
#                             connection fails. Never done otherwise, except on a cluster this
#                             script has just installed.
#   WAIT_SECONDS              how long to wait for a service to come up (default 60).
set -euo pipefail

WAIT_SECONDS="${WAIT_SECONDS:-60}"

log() { printf '%s\n' "$*"; }
err() { printf 'ensure-services: error: %s\n' "$*" >&2; }
die() {
    err "$*"
    exit 1
}

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Like as_root, but never prompts for a password; for optional steps whose failure is ignored.
as_root_try() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        "$@"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* by hand"
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root apt-get update -q >/dev/null
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

# Does something accept TCP connections on host:port?
tcp_open() {
    timeout 3 bash -c "</dev/tcp/$1/$2" >/dev/null 2>&1
}

# Does the AMQP server on host:port answer the protocol header with its first frame? A broker
# that has run out of file handles still accepts TCP connections but never answers, and every
# client then hangs until its own timeout.
amqp_answers() {
    timeout 10 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "AMQP\x00\x00\x09\x01" >&3
        # The first byte of a Connection.Start frame is the frame type 1 (method).
        [ "$(head -c 1 <&3 | od -An -tu1 | tr -d " ")" = "1" ]
    ' amqp_answers "$1" "$2" >/dev/null 2>&1
}

# url_part URL FIELD: prints host, port or user of a URL like
# scheme://user:pass@host:port/path?query (host may be [v6]). Empty when absent.
url_part() {
    local url="$1" field="$2" rest userinfo="" hostport host port=""
    rest="${url#*://}"
    rest="${rest%%[/?#]*}"
    if [[ "$rest" == *@* ]]; then
        userinfo="${rest%@*}"
        hostport="${rest##*@}"
    else
        hostport="$rest"
    fi
    if [[ "$hostport" == \[* ]]; then
        host="${hostport%%]*}"
        host="${host#[}"
        rest="${hostport#*]}"
        [[ "$rest" == :* ]] && port="${rest#:}"
    elif [[ "$hostport" == *:* ]]; then
        host="${hostport%%:*}"
        port="${hostport#*:}"
    else
        host="$hostport"
    fi
    case "$field" in
        host) printf '%s' "$host" ;;
        port) printf '%s' "$port" ;;
        user) printf '%s' "${userinfo%%:*}" ;;
    esac
}

# An empty host means a Unix socket (or libpq's default), which is local too.
is_loopback_host() {
    case "$1" in
        "" | localhost | localhost.localdomain | 127.* | ::1 | 0:0:0:0:0:0:0:1 | /* | %2F* | %2f*) return 0 ;;
        *) return 1 ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# C toolchain
# ---------------------------------------------------------------------------------------------
ensure_toolchain() {
    local missing=()
    command -v cc >/dev/null 2>&1 || missing+=(build-essential)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    if [ "${#missing[@]}" -eq 0 ]; then
        log "C toolchain: cc and pkg-config present"
        return
    fi
    # build-essential and pkg-config are installed together when cc is missing.
    if [[ " ${missing[*]} " == *" build-essential "* ]]; then
        missing=(build-essential pkg-config)
    fi
    log "C toolchain: installing ${missing[*]}"
    apt_install "${missing[@]}" >/dev/null
    log "C toolchain: installed ${missing[*]}"
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres

pg_ready() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 2 >/dev/null 2>&1
    else
        tcp_open "$PG_HOST" "$PG_PORT"
    fi
}

# Password-less connection as $PG_USER over TCP; never prompts.
pg_select1() {
    PGCONNECT_TIMEOUT=5 psql -X -w -q -A -t -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres \
        -c 'select 1' >/dev/null 2>&1
}

# Prints "version name" of the local cluster to use: the one named main on $PG_PORT, else any
# cluster named main, else the first one. Prints nothing when there is no cluster.
pg_find_cluster() {
    command -v pg_lsclusters >/dev/null 2>&1 || return 0
    local lines
    lines="$(pg_lsclusters -h 2>/dev/null || true)"
    [ -n "$lines" ] || return 0
    awk -v port="$PG_PORT" '
        $2 == "main" && $3 == port { print $1, $2; found = 1; exit }
        $2 == "main" && !main { main = $1 " " $2 }
        !first { first = $1 " " $2 }
        END { if (!found) { if (main) print main; else if (first) print first } }
    ' <<<"$lines"
}

# Prints "version name" of a local cluster that is online on $PG_PORT, or nothing.
pg_cluster_online_on_port() {
    command -v pg_lsclusters >/dev/null 2>&1 || return 0
    pg_lsclusters -h 2>/dev/null | awk -v port="$PG_PORT" '$3 == port && $4 ~ /^online/ { print $1, $2; exit }' || true
}

pg_wait_ready() {
    local i
    for ((i = 0; i < WAIT_SECONDS; i++)); do
        pg_ready && return 0
        sleep 1
    done
    return 1
}

# Prepends trust lines for user postgres over loopback to the cluster's pg_hba.conf and reloads.
pg_configure_trust() {
    local ver="$1" name="$2" hba tmp
    hba="$(pg_conftool -s "$ver" "$name" show hba_file 2>/dev/null | tr -d "'" || true)"
    [ -n "$hba" ] || hba="/etc/postgresql/$ver/$name/pg_hba.conf"
    as_root test -f "$hba" || die "pg_hba.conf not found at $hba"
    if as_root grep -qxF "host all postgres 127.0.0.1/32 trust" "$hba"; then
        log "PostgreSQL: pg_hba.conf of cluster $ver/$name already trusts postgres over loopback, reloading"
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" reload
        return
    fi
    tmp="$(mktemp)"
    {
        echo "# Added by scripts/ensure-services.sh: password-less loopback TCP for user postgres"
        echo "host all postgres 127.0.0.1/32 trust"
        echo "host all postgres ::1/128 trust"
        as_root cat "$hba"
    } >"$tmp"
    as_root cp -p "$hba" "$hba.before-ensure-services"
    # Writing through the existing file keeps its owner and mode.
    as_root tee "$hba" <"$tmp" >/dev/null
    rm -f "$tmp"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" reload
    log "PostgreSQL: pg_hba.conf of cluster $ver/$name now trusts user postgres over loopback"
}

ensure_postgres() {
    if [ -n "${DATABASE_URL:-}" ]; then
        local host port user
        host="$(url_part "$DATABASE_URL" host)"
        port="$(url_part "$DATABASE_URL" port)"
        user="$(url_part "$DATABASE_URL" user)"
        if ! is_loopback_host "$host"; then
            log "PostgreSQL: DATABASE_URL points to $host, not managing a local server"
            return
        fi
        [ -n "$port" ] && PG_PORT="$port"
        [ -n "$user" ] && PG_USER="$user"
    fi

    local status cluster ver name installed_here=0 ver_dir
    if pg_ready; then
        status="PostgreSQL already running on $PG_HOST:$PG_PORT"
    else
        cluster="$(pg_find_cluster)"
        if [ -n "$cluster" ]; then
            status="PostgreSQL started"
        else
            if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
                log "PostgreSQL: not installed, installing the postgresql package"
                apt_install postgresql >/dev/null
            fi
            cluster="$(pg_find_cluster)"
            if [ -z "$cluster" ]; then
                # The package normally creates "main"; create it when it did not.
                ver_dir="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)"
                [ -n "$ver_dir" ] || die "PostgreSQL server binaries not found after install"
                as_root pg_createcluster --port "$PG_PORT" "$ver_dir" main >/dev/null
                cluster="$ver_dir main"
            fi
            installed_here=1
            status="PostgreSQL installed and started"
        fi
        read -r ver name <<<"$cluster"
        if as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" status >/dev/null 2>&1; then
            # Already running (the package's own start, or it only listens elsewhere).
            :
        elif ! as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start; then
            err "pg_ctlcluster $ver $name start failed (see /var/log/postgresql/postgresql-$ver-$name.log); waiting anyway"
        fi
        if ! pg_wait_ready; then
            pg_lsclusters >&2 || true
            die "PostgreSQL not ready on $PG_HOST:$PG_PORT after ${WAIT_SECONDS}s (is listen_addresses/port right? see /var/log/postgresql/postgresql-$ver-$name.log)"
        fi
        if [ "$installed_here" -eq 1 ] && [ "$PG_USER" = postgres ]; then
            pg_configure_trust "$ver" "$name"
        fi
    fi

    if ! command -v psql >/dev/null 2>&1; then
        log "PostgreSQL: psql not found, installing postgresql-client"
        apt_install postgresql-client >/dev/null
    fi

    if ! pg_select1 && [ "${WALLET_CONFIGURE_PG_TRUST:-0}" = 1 ] && [ "$PG_USER" = postgres ]; then
        # Only for a cluster of this machine that is online on the port, never for something
        # else answering there (a container, a tunnel).
        cluster="$(pg_cluster_online_on_port)"
        if [ -n "$cluster" ]; then
            read -r ver name <<<"$cluster"
            log "PostgreSQL: password-less login as postgres failed and WALLET_CONFIGURE_PG_TRUST=1"
            pg_configure_trust "$ver" "$name"
        else
            err "WALLET_CONFIGURE_PG_TRUST=1 ignored: no local cluster is online on port $PG_PORT"
        fi
    fi

    if ! pg_select1; then
        err "cannot run 'select 1' as $PG_USER on $PG_HOST:$PG_PORT without a password:"
        PGCONNECT_TIMEOUT=5 psql -X -w -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -c 'select 1' >&2 || true
        die "let user $PG_USER connect over loopback TCP (pg_hba.conf 'trust' for 127.0.0.1/32), set DATABASE_URL to a server you can reach, or rerun with WALLET_CONFIGURE_PG_TRUST=1"
    fi
    log "$status"
}

# ---------------------------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------------------------
AMQP_HOST=127.0.0.1
AMQP_PORT=5672

enable_management() {
    command -v rabbitmq-plugins >/dev/null 2>&1 || return 0
    # Already answering: nothing to do (and no CLI start-up cost).
    tcp_open 127.0.0.1 15672 && return 0
    as_root_try rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1 || true
}

rabbit_start() {
    # Every quorum queue keeps a few files open. With a soft limit of 1,024 open files (the
    # default of many systems) about 300 queues leave the broker no handle for new connections,
    # and the test suite declares 18 queues for each system it starts. So the broker gets the
    # hard limit.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    if [ "$(id -u)" -eq 0 ] && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && id rabbitmq >/dev/null 2>&1; then
        # Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user with su, whose PAM
        # session resets the soft limit to 1,024 (seen here): raise it after the switch.
        (cd /var/lib/rabbitmq && su rabbitmq -s /bin/sh -c \
            'ulimit -n "$(ulimit -Hn)"; exec /usr/lib/rabbitmq/bin/rabbitmq-server -detached')
    else
        as_root rabbitmq-server -detached
    fi
    # await_startup can fail at once while the new node is not yet reachable: retry until the
    # deadline.
    local deadline=$((SECONDS + WAIT_SECONDS))
    until as_root timeout 30 rabbitmqctl await_startup --timeout 20 >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "RabbitMQ did not start within ${WAIT_SECONDS}s (see /var/log/rabbitmq/)"
        fi
        sleep 2
    done
    until tcp_open "$AMQP_HOST" "$AMQP_PORT"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "RabbitMQ started but nothing answers on $AMQP_HOST:$AMQP_PORT"
        fi
        sleep 1
    done
}

ensure_rabbitmq() {
    if [ -n "${AMQP_URL:-}" ]; then
        local host port
        host="$(url_part "$AMQP_URL" host)"
        port="$(url_part "$AMQP_URL" port)"
        if ! is_loopback_host "$host"; then
            log "RabbitMQ: AMQP_URL points to $host, not managing a local broker"
            return
        fi
        [ -n "$port" ] && AMQP_PORT="$port"
    fi

    if tcp_open "$AMQP_HOST" "$AMQP_PORT"; then
        amqp_answers "$AMQP_HOST" "$AMQP_PORT" ||
            die "RabbitMQ on $AMQP_HOST:$AMQP_PORT accepts connections but does not answer AMQP. A common cause is a broker out of file handles (many leftover quorum queues under a limit of 1,024 open files): see 'rabbitmq-diagnostics status' (file descriptors), delete leftover queues, or restart it with a higher 'ulimit -n'."
        enable_management
        log "RabbitMQ already running on $AMQP_HOST:$AMQP_PORT"
        return
    fi

    if command -v rabbitmq-server >/dev/null 2>&1; then
        rabbit_start
        enable_management
        log "RabbitMQ started"
        return
    fi

    log "RabbitMQ: not installed, installing rabbitmq-server (a 'policy-rc.d denied' message is expected)"
    apt_install rabbitmq-server >/dev/null
    rabbit_start
    as_root rabbitmq-plugins enable rabbitmq_management >/dev/null ||
        err "could not enable rabbitmq_management (the broker itself works)"
    log "RabbitMQ installed and started"
}

ensure_toolchain
ensure_postgres
ensure_rabbitmq
