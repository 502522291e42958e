#!/bin/bash
# Where a proxy's CPU goes at 32 connections: CPU seconds per 10,000
# requests split into user and system time, each thread's CPU and context
# switches, and on request a perf profile. The load test says how much;
# this says where, with the same setup.
#
#   bash loadtest/profile.sh [TARGET] [perf]
#
# TARGET: `tether` (default; the load test's cached run: mTLS, registry,
# Cedar, audit line, span exported to a rotel collector), `tether-nospans`
# (the same with span export off), `tether-uncached` (the load test's
# uncached run: a new repository each request, so Cedar decides every
# one) or `pingora` (the bare pingora mTLS proxy). `perf` also records `perf record -g` (software clock) into
# loadtest/work/profile/perf.data: a flat profile as built, call graphs
# with a build made with RUSTFLAGS="-C force-frame-pointers=yes" (point
# TETHER_BIN, or BARE_BIN for the bare proxy, at it). Run it on a quiet
# machine, after `python3 loadtest/run.py` (any mode): it reuses that
# run's certificates, upstream, binaries, oha, rotel and the Tether config
# it checked.
#
#   bash loadtest/profile.sh [TARGET] callgrind [REQUESTS]
#
# counts instead the instructions the proxy runs per request (user space,
# all its threads, under valgrind's callgrind): a measure that a busy or
# noisy host cannot move, for comparing builds and targets where CPU
# seconds swing by a third from one run to the next. It instruments
# REQUESTS requests (default 20,000) at 32 connections after a warm-up,
# their 32 TLS handshakes included, and the span export they cause; the
# profile is left in loadtest/work/profile/callgrind.out.1 for
# callgrind_annotate.
#
# OTLP_PROTOCOL=http exports spans over OTLP/HTTP instead of gRPC.
# COLLECTOR_NICE=N runs the collector at that niceness (default 0, as
# the load test does): to see what its preempting the proxy costs.
#
# A profile of Tether exporting to no collector measures the wrong thing
# (it happened: a collector on the wrong port, and the kernel took the
# blame); the script refuses to report one whose spans were dropped.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/common.sh
TARGET=${1:-tether}
MODE=${2:-cpu}
BARE=${BARE_BIN:-target/loadtest/release/examples/bare_mtls}
ROTEL=$(realpath target/tools/*venv*/lib/python3*/site-packages/rotel/rotel-agent 2>/dev/null | head -1)
require "$CHECKED" "$TETHER" "$OHA" "$ROTEL" "$WORK/upstream/nginx.conf"
case $TARGET in
    tether | tether-nospans | tether-uncached) ;;
    pingora) require "$BARE" ;;
    *) echo "unknown target $TARGET: tether, tether-nospans, tether-uncached or pingora" >&2; exit 2 ;;
esac
case $MODE in
    cpu) ;;
    perf) command -v perf > /dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; } ;;
    callgrind)
        command -v callgrind_control > /dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
        REQUESTS=${3:-20000}
        # Instrumentation starts off (start-up and warm-up are not counted)
        # and is switched on around the measured requests.
        LAUNCH="valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$PWD/$WORK/profile/callgrind.out"
        ;;
    *) echo "unknown mode $MODE: cpu, perf or callgrind" >&2; exit 2 ;;
esac

DIR=$WORK/profile
rm -rf "$DIR" && mkdir -p "$DIR"
# The checked config, audit to this folder; span export dropped for
# tether-nospans.
python3 - "$CHECKED" "$DIR/tether.yaml" "$PWD/$DIR/audit.log" "$TARGET" "${OTLP_PROTOCOL:-grpc}" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
text = re.sub(r"^(  output:).*$", r"\1 " + sys.argv[3], text, flags=re.M)
if sys.argv[5] == "http":  # the collector's OTLP/HTTP port is the next one
    text = re.sub(r"endpoint: http://127.0.0.1:(\d+)\n(\s+)protocol: grpc",
                  lambda m: f"endpoint: http://127.0.0.1:{int(m[1]) + 1}\n{m[2]}protocol: http_protobuf", text)
if sys.argv[4] == "tether-nospans":
    text = re.sub(r"^  otlp:\n(?:    .*\n)+", "", text, flags=re.M)
open(sys.argv[2], "w").write(text)
EOF
LISTEN=$(port "$DIR/tether.yaml" 1) ADMIN=$(port "$DIR/tether.yaml" 2)
OTLP=$(grep -m1 'endpoint: http://127.0.0.1:' "$WORK/check/tether.yaml" | sed 's/.*127.0.0.1://')

start_upstream
UPSTREAM_PORT=$(port "$DIR/tether.yaml" 3)
(cd "$DIR" && exec nice -n "${COLLECTOR_NICE:-0}" "$ROTEL" start --exporter blackhole --otlp-grpc-endpoint "127.0.0.1:$OTLP" \
    --otlp-http-endpoint "127.0.0.1:$((OTLP + 1))" > rotel.log 2>&1) &
COLLECTOR=$!
PROXY=
trap 'kill -INT $PROXY 2>/dev/null; kill $UPSTREAM $COLLECTOR 2>/dev/null; wait 2>/dev/null' EXIT
if [ "$TARGET" = pingora ]; then
    ${LAUNCH:-} "$BARE" --listen "127.0.0.1:$LISTEN" --upstream "127.0.0.1:$UPSTREAM_PORT" \
        --cert $WORK/certs/server.pem --key $WORK/certs/server-key.pem --ca $WORK/certs/ca.pem \
        --threads 1 > "$DIR/bare.log" 2>&1 &
    PROXY=$!
    until (exec 3<>"/dev/tcp/127.0.0.1/$LISTEN") 2>/dev/null; do
        alive $PROXY || { cat "$DIR/bare.log"; exit 1; }
        sleep 0.01
    done
else
    start_tether "$DIR/tether.yaml" "$ADMIN"
fi

# The load test's URLs: one repository, whose decision is cached after the
# first request, or (tether-uncached) one of a billion, each new.
URL=(https://127.0.0.1:$LISTEN/v1/repos/tether/issues)
if [ "$TARGET" = tether-uncached ]; then
    URL=(--rand-regex-url "https://127.0.0.1:$LISTEN/v1/repos/r[0-9]{9}/issues")
fi
# `load DURATION|-n COUNT OUTPUT`: 32 connections for a time or a count.
load() {
    local amount=(-z "$1")
    [ "$1" = -n ] && { amount=(-n "$2"); shift; }
    "$OHA" --no-tui --worker-threads 1 --disable-compression -c 32 "${amount[@]}" --cacert $WORK/certs/ca.pem \
        --cert $WORK/certs/agent.pem --key $WORK/certs/agent-key.pem --output-format json -o "$2" \
        "${URL[@]}" > /dev/null 2>&1
}
# Every thread's name, user and system ticks, context switches, and
# nanoseconds spent ready to run but waiting for a core (schedstat).
threads() {
    for t in /proc/$PROXY/task/*; do
        printf '%s\t%s\t%s\t%s\t%s\n' "$(cat "$t/comm")" "$(sed 's/.*) //' "$t/stat" | cut -d' ' -f12,13)" \
            "$(awk '/^voluntary_ctxt/ {print $2}' "$t/status")" "$(awk '/^nonvoluntary_ctxt/ {print $2}' "$t/status")" \
            "$(cut -d' ' -f2 "$t/schedstat")"
    done
}

if [ "$MODE" = callgrind ]; then
    load -n 1000 /dev/null # warm-up: first decisions, allocator
    callgrind_control --instr=on $PROXY > /dev/null
    load -n "$REQUESTS" "$DIR/oha.json"
    # One export interval, so the span export these requests cause is in.
    sleep 1.5
    callgrind_control --instr=off $PROXY > /dev/null
    callgrind_control --dump $PROXY > /dev/null # to callgrind.out.1
    DROPPED=0
    if [ "$TARGET" != pingora ]; then
        DROPPED=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '$1 == "tether_spans_dropped_total" {printf "%d", $2}')
    fi
    python3 - "$DIR" "$TARGET" "${DROPPED:-0}" <<'EOF'
import json, re, sys
d, target, dropped = sys.argv[1], sys.argv[2], int(sys.argv[3])
oha = json.load(open(f"{d}/oha.json"))
n = sum(oha["statusCodeDistribution"].values())
ok = oha["statusCodeDistribution"].get("200", 0)
# `totals: N` closes the file: the instructions collected.
text = open(f"{d}/callgrind.out.1", errors="replace").read()
total = sum(int(m) for m in re.findall(r"^totals: (\d+)", text, flags=re.M))
print(f"{target}: {total / n:,.0f} instructions per request ({total:,} for {ok}/{n} 200s)")
print(f"profile: callgrind_annotate --inclusive=yes {d}/callgrind.out.1")
if dropped:
    sys.exit(f"{dropped} spans dropped: the collector did not take them, so this is not the load test's setup")
if ok != n or n == 0:
    sys.exit("some responses were not 200")
EOF
    exit
fi

# The whole host's CPU (the first line of /proc/stat: user nice system
# idle iowait irq softirq steal) and the upstream's and collector's ticks:
# whether the cores were saturated, and by whom.
host() {
    echo "$(head -1 /proc/stat | cut -d' ' -f3-10) $(pid_ticks $UPSTREAM) $(pid_ticks $COLLECTOR)"
}
pid_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

load 2s /dev/null # warm-up: handshakes, first decisions, allocator
threads > "$DIR/before.tsv"
host > "$DIR/host-before.txt"
if [ "$MODE" = perf ]; then
    perf record -F 2000 -e cpu-clock -g -p "$PROXY" -o "$DIR/perf.data" -- sleep 10 > /dev/null 2>&1 &
    RECORDING=$!
fi
load 10s "$DIR/oha.json"
threads > "$DIR/after.tsv"
host > "$DIR/host-after.txt"
[ "$MODE" = perf ] && wait $RECORDING

DROPPED=0
if [ "$TARGET" != pingora ]; then
    DROPPED=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '$1 == "tether_spans_dropped_total" {printf "%d", $2}')
fi
python3 - "$DIR" "$TARGET" "$MODE" "${DROPPED:-0}" "$(getconf CLK_TCK)" <<'EOF'
import json, os, sys
d, target, mode, dropped, hz = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
oha = json.load(open(f"{d}/oha.json"))
n = sum(oha["statusCodeDistribution"].values())
ok = oha["statusCodeDistribution"].get("200", 0)
def read(name):
    rows = {}
    for line in open(f"{d}/{name}"):
        comm, ticks, vol, invol, waited = line.rstrip("\n").split("\t")
        user, sys_ = map(int, ticks.split())
        key = comm
        while key in rows:  # threads sharing a name
            key += "'"
        rows[key] = (user, sys_, int(vol), int(invol), int(waited))
    return rows
before, after = read("before.tsv"), read("after.tsv")
per_10k = lambda ticks: ticks / hz / n * 1e4
user = sum(a[0] - before.get(k, (0,) * 5)[0] for k, a in after.items())
sys_ = sum(a[1] - before.get(k, (0,) * 5)[1] for k, a in after.items())
print(f"{target}: {oha['summary']['requestsPerSec']:.0f} req/s, {ok}/{n} 200s")
print(f"CPU s/10k: {per_10k(user + sys_):.3f} (user {per_10k(user):.3f}, system {per_10k(sys_):.3f})")
# "waited s": time ready to run while another task had the core.
print(f"{'thread':<18}{'CPU s':>8}{'switches':>10}{'preempted':>11}{'waited s':>10}")
for k, a in after.items():
    b = before.get(k, (0,) * 5)
    cpu = (a[0] + a[1] - b[0] - b[1]) / hz
    if cpu or a[2] - b[2] or a[3] - b[3]:
        print(f"{k:<18}{cpu:>8.2f}{a[2] - b[2]:>10}{a[3] - b[3]:>11}{(a[4] - b[4]) / 1e9:>10.2f}")
# Cores used over the load: the proxy, the upstream, the collector, the
# rest (the load generator, and kernel time in interrupts charged to no
# process), and idle.
h0, h1 = (list(map(int, open(f"{d}/host-{w}.txt").read().split())) for w in ("before", "after"))
delta = [b - a for a, b in zip(h0, h1)]
busy = sum(delta[0:3]) + sum(delta[5:8])
wall = sum(delta[0:8]) / os.cpu_count()
proxy = (user + sys_) / wall
upstream, collector = delta[8] / wall, delta[9] / wall
cores = lambda t: t / wall
print(f"host cores: proxy {proxy:.2f}, upstream {upstream:.2f}, collector {collector:.2f}, "
      f"other {cores(busy) - proxy - upstream - collector:.2f} (interrupts {cores(sum(delta[5:7])):.2f}, "
      f"steal {cores(delta[7]):.2f}), idle {cores(delta[3] + delta[4]):.2f} of {os.cpu_count()}")
if mode == "perf":
    print(f"profile: perf report -i {d}/perf.data --no-children --sort symbol")
if dropped:
    sys.exit(f"{dropped} spans dropped: the collector did not take them, so this is not the load test's setup")
if ok != n:
    sys.exit("some responses were not 200")
EOF
