# Shared by the scripts that run after `python3 loadtest/run.py` (reload.sh,
# memory.sh): that run's files, and starting the upstream and Tether.
# Source it from the repository root.
WORK=loadtest/work
CHECKED=$WORK/check/tether.yaml
TETHER=${TETHER_BIN:-target/loadtest/release/tether}
OHA=target/tools/bin/oha

# Fails unless every named file exists.
require() {
    for f in "$@"; do
        [ -e "$f" ] || { echo "missing ${f:-a file}: run python3 loadtest/run.py --quick first" >&2; exit 1; }
    done
}

# The port of the Nth `address: 127.0.0.1:` line of a config: the
# listener's is first, the admin's second.
port() { grep -m "$2" '^  address: 127.0.0.1:' "$1" | tail -1 | sed 's/.*127.0.0.1://'; }

# Starts the run's upstream nginx; sets UPSTREAM to its pid.
start_upstream() {
    nginx -e "$PWD/$WORK/upstream/error.log" -p "$PWD/$WORK/upstream" -c "$PWD/$WORK/upstream/nginx.conf" &
    UPSTREAM=$!
}

# Whether Tether's admin port $1 answers /readyz with 200. Bash built-ins
# only: a curl per poll cost more CPU than Tether's start it was timing.
ready() {
    local status
    { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
    printf 'GET /readyz HTTP/1.1\r\nHost: tether\r\nConnection: close\r\n\r\n' >&3
    read -r _ status _ <&3
    exec 3<&-
    [ "$status" = 200 ]
}

# Starts Tether with config $1 (log beside it) and waits until its admin
# port $2 answers /readyz; sets PROXY to its pid. $LAUNCH, when set, is a
# command that runs Tether (valgrind, for one).
# Whether process $1 is running (not exited, not a zombie).
alive() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [ -n "$state" ] && [ "$state" != Z ]
}

start_tether() {
    RUST_LOG=warn ${LAUNCH:-} "$TETHER" run --config "$1" > "$(dirname "$1")/tether.log" 2>&1 &
    PROXY=$!
    until ready "$2"; do
        # A child that exited is a zombie until reaped, and `kill -0`
        # still finds it: read its state instead.
        alive $PROXY || { cat "$(dirname "$1")/tether.log"; exit 1; }
        sleep 0.002
    done
}
