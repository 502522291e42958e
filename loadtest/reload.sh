#!/bin/bash
# Start-to-ready and reload time with 10,000 more policies, under traffic.
#
# Run after `python3 loadtest/run.py` (any mode): it reuses that run's
# certificates, upstream nginx config, release binary, oha and the Tether
# config it checked (loadtest/work/check/tether.yaml), with the example
# policies plus 10,000 generated ones (one permit per agent, each with a
# `when`). It times `tether run` to `/readyz` 200 (three starts, the
# median), then five `POST /reload`
# while oha sends 500 req/s over mTLS, and prints every status oha saw:
# a reload must fail no request.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/common.sh
require "$CHECKED" "$TETHER" "$OHA" "$WORK/upstream/nginx.conf"

DIR=$WORK/reload
rm -rf "$DIR" && mkdir -p "$DIR/policies"
cp deploy/examples/policies/*.cedar "$DIR/policies/"
python3 - "$DIR/policies/many.cedar" <<'EOF'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(10000):
        f.write(f'@id("agent-{i}")\n'
                f'permit (principal == Agent::"spiffe://example.org/agents/a{i}", '
                f'action == Action::"ReadIssues", resource)\n'
                f'when {{ principal.team == "team-{i % 10}" }};\n\n')
EOF
sed -e "s#^\(  policies:\).*#\1 $PWD/$DIR/policies#" \
    -e "s#^\(  output:\).*#\1 $PWD/$DIR/audit.log#" "$CHECKED" > "$DIR/tether.yaml"
# The POSTs below are what is timed: the watcher must not reload first.
printf 'reload:\n  watch: false\n' >> "$DIR/tether.yaml"
LISTEN=$(port "$DIR/tether.yaml" 1) ADMIN=$(port "$DIR/tether.yaml" 2)

start_upstream
trap 'kill -INT $PROXY 2>/dev/null; kill $UPSTREAM 2>/dev/null; wait 2>/dev/null' EXIT
# Start to ready, timed from Python: it polls /readyz in-process every
# 2 ms, where a shell's poll starts a process each time and takes CPU from
# the start it times. Three starts; the median counts.
python3 - "$TETHER" "$DIR/tether.yaml" "$ADMIN" \
    "$(grep -c '^@id' "$DIR"/policies/*.cedar | awk -F: '{s+=$2} END {print s}')" <<'EOF'
import os, subprocess, sys, time, urllib.request
tether, config, admin, policies = sys.argv[1:]
times = []
for _ in range(3):
    start = time.monotonic()
    proc = subprocess.Popen([tether, "run", "--config", config], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="warn"))
    while True:
        if proc.poll() is not None:
            sys.exit(f"tether exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.002)
    times.append((time.monotonic() - start) * 1000)
    proc.terminate()
    proc.wait()
print(f"start to ready with {policies} policies: {sorted(times)[1]:.0f} ms "
      f"(median of {', '.join(f'{t:.0f}' for t in times)})")
EOF
start_tether "$DIR/tether.yaml" "$ADMIN"

"$OHA" --no-tui -z 8s -q 500 -c 8 --worker-threads 1 --cacert $WORK/certs/ca.pem \
    --cert $WORK/certs/agent.pem --key $WORK/certs/agent-key.pem --output-format json \
    -o "$DIR/oha.json" "https://127.0.0.1:$LISTEN/v1/repos/tether/issues" > /dev/null 2>&1 &
LOAD=$!
sleep 1
for i in 1 2 3 4 5; do
    # A change to read: a reload with no file changed reads nothing.
    echo "// reload $i" >> "$DIR/policies/many.cedar"
    curl -s -o "$DIR/reload.json" -w "reload $i: HTTP %{http_code} in %{time_total} s: " \
        -X POST "http://127.0.0.1:$ADMIN/reload"
    cat "$DIR/reload.json"; echo
    sleep 0.5
done
wait $LOAD
python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print('responses during the reloads:', \
d['statusCodeDistribution'], '(an aborted request is one oha cut at its deadline)', d['errorDistribution'])" "$DIR/oha.json"
