#!/bin/bash
# Peak RSS with 100,000 cached decisions: the issue's "≤ 64 MiB under load".
#
# Run after `python3 loadtest/run.py` (any mode): it reuses that run's
# certificates, upstream nginx config, release binary, oha, rotel and the
# Tether config it checked (loadtest/work/check/tether.yaml), with the
# decision cache at its defaults (100,000 entries) and tracing (OTLP/gRPC
# to a blackhole rotel collector) and audit (to a file) on, as in every
# load run. oha sends 110,000 requests over 32 mTLS connections, each for a
# random repository (`/v1/repos/rNNNNNNNNN/issues`): every request is a
# miss, a Cedar evaluation and a new entry, until the cache is full. The
# peak is the kernel's high-water mark (VmHWM), so no spike is missed.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/common.sh
ROTEL=$(realpath target/tools/*venv*/lib/python3*/site-packages/rotel/rotel-agent 2>/dev/null | head -1)
require "$CHECKED" "$TETHER" "$OHA" "$ROTEL" "$WORK/upstream/nginx.conf"

DIR=$WORK/memory
rm -rf "$DIR" && mkdir -p "$DIR"
# The checked config with the cache section dropped (defaults), audit to
# this folder.
python3 - "$CHECKED" "$DIR/tether.yaml" "$PWD/$DIR/audit.log" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
text = re.sub(r"^cache:\n(?:[ #].*\n)*", "", text, flags=re.M)
text = re.sub(r"^(  output:).*$", r"\1 " + sys.argv[3], text, flags=re.M)
open(sys.argv[2], "w").write(text)
EOF
LISTEN=$(port "$DIR/tether.yaml" 1) ADMIN=$(port "$DIR/tether.yaml" 2)
OTLP=$(grep -m1 'endpoint: http://127.0.0.1:' "$DIR/tether.yaml" | sed 's/.*127.0.0.1://')

start_upstream
(cd "$DIR" && exec "$ROTEL" start --exporter blackhole --otlp-grpc-endpoint "127.0.0.1:$OTLP" \
    --otlp-http-endpoint "127.0.0.1:$((OTLP + 1))" > rotel.log 2>&1) &
COLLECTOR=$!
trap 'kill -INT $PROXY 2>/dev/null; kill $UPSTREAM $COLLECTOR 2>/dev/null; wait 2>/dev/null' EXIT
start_tether "$DIR/tether.yaml" "$ADMIN"
# RSS now, or its peak so far (the kernel's high-water mark), in KiB.
rss() { awk '/^VmRSS/ {print $2}' "/proc/$PROXY/status"; }
peak_rss() { awk '/^VmHWM/ {print $2}' "/proc/$PROXY/status"; }
echo "idle RSS: $(($(rss) / 1024)) MiB"

"$OHA" --no-tui -n 110000 -c 32 --worker-threads 1 --rand-regex-url --cacert $WORK/certs/ca.pem \
    --cert $WORK/certs/agent.pem --key $WORK/certs/agent-key.pem --output-format json \
    -o "$DIR/oha.json" "https://127.0.0.1:$LISTEN/v1/repos/r[0-9]{9}/issues" > /dev/null 2>&1 &
LOAD=$!
wait $LOAD
sleep 1
metrics=$(curl -s "http://127.0.0.1:$ADMIN/metrics")
metric() { echo "$metrics" | awk -v m="$1" '$1 == m {printf "%d", $2}'; }
python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print('responses:', d['statusCodeDistribution'], \
'req/s: %.0f' % d['summary']['requestsPerSec'])" "$DIR/oha.json"
echo "decisions cached: $(metric tether_decision_cache_entries); spans dropped: $(metric tether_spans_dropped_total); audit lines dropped: $(metric tether_audit_dropped_total)"
echo "peak RSS under load: $(($(peak_rss) / 1024)) MiB; after: $(($(rss) / 1024)) MiB"
