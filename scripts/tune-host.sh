#!/usr/bin/env bash
# Sets the kernel's background writeback threshold for a host that runs the wallet's PostgreSQL:
# vm.dirty_background_bytes = 4 MiB, so the kernel writes dirty page cache back as it comes
# instead of in bursts.
#
# Why: PostgreSQL leaves the pages of its growing tables dirty in the page cache, about 5 MB/s at
# 4,000 purchases/s. With the kernel's defaults (background writeback from
# 10 % of memory, pages older than 30 s written anyway) a machine with much memory lets them build
# up for 30 s and then writes back around 100 MB at once, and every fdatasync of PostgreSQL's and
# RabbitMQ's logs waits behind that burst for 50-250 ms. Every command in flight waits with them,
# and the latency tail is those bursts (BENCHMARKS.md, profile item 51). With 4 MiB the same data
# goes out in small writes all the time, and the flushes stay fast.
#
# Opt-in: neither the tests nor the benchmark run it; `bench` prints a warning when the threshold
# is above 64 MiB. It changes a setting of the whole host (the host a container runs on, too:
# vm.* is not namespaced), so run it only where the wallet's PostgreSQL is what the host is for.
#
# Usage:
#   scripts/tune-host.sh            apply it now (root, or sudo), until the next boot
#   scripts/tune-host.sh --persist  also write /etc/sysctl.d/60-wallet-writeback.conf
#   scripts/tune-host.sh --check    say what the host has; exit 1 when it is not tuned
# To undo: sysctl -w vm.dirty_background_ratio=10 (the kernel's default), and remove the file.
set -euo pipefail

TARGET_BYTES=4194304
SYSCTL_FILE=/etc/sysctl.d/60-wallet-writeback.conf

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

mode=apply
case "${1:-}" in
"") ;;
--persist) mode=persist ;;
--check) mode=check ;;
-h | --help)
    usage
    exit 0
    ;;
*)
    echo "tune-host: unknown argument: $1 (see --help)" >&2
    exit 2
    ;;
esac

current_bytes="$(cat /proc/sys/vm/dirty_background_bytes)"
current_ratio="$(cat /proc/sys/vm/dirty_background_ratio)"
describe() {
    if [ "$current_bytes" -gt 0 ]; then
        echo "vm.dirty_background_bytes = $current_bytes"
    else
        echo "vm.dirty_background_ratio = $current_ratio % (vm.dirty_background_bytes = 0)"
    fi
}
tuned() { [ "$current_bytes" -gt 0 ] && [ "$current_bytes" -le "$TARGET_BYTES" ]; }

die() {
    echo "tune-host: $*" >&2
    exit 1
}
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ "$mode" = check ]; then
    if tuned; then
        echo "tune-host: tuned: $(describe)"
        exit 0
    fi
    echo "tune-host: not tuned: $(describe); scripts/tune-host.sh sets vm.dirty_background_bytes = $TARGET_BYTES"
    exit 1
fi

if tuned; then
    echo "tune-host: already tuned: $(describe); nothing changed"
else
    echo "tune-host: was $(describe); setting vm.dirty_background_bytes = $TARGET_BYTES"
    as_root sysctl -q -w "vm.dirty_background_bytes=$TARGET_BYTES"
fi

if [ "$mode" = persist ]; then
    line="vm.dirty_background_bytes = $TARGET_BYTES"
    if [ -f "$SYSCTL_FILE" ] && grep -qxF "$line" "$SYSCTL_FILE"; then
        echo "tune-host: $SYSCTL_FILE already says so"
    else
        printf '# scripts/tune-host.sh of the wallet: small, steady writeback (see the script).\n%s\n' "$line" |
            as_root tee "$SYSCTL_FILE" >/dev/null
        echo "tune-host: wrote $SYSCTL_FILE"
    fi
fi
