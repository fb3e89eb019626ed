# Shell functions shared by the scripts of this folder. Sourced, never run; the sourcing script
# defines die() (its message and exit) first.

# as_root COMMAND...: runs a command as root: directly when root, else through sudo when it
# exists, else dies naming the command.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root for: $* (not root and no sudo)"
    fi
}
