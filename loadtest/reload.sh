#!/bin/bash
# Start-to-ready and reload time with 10,000 more policies, under traffic.
#
# Run after `python3 loadtest/run.py` (any mode): it reuses that run's
# certificates, upstream nginx config, release binary, oha and the Tether
# config it checked (loadtest/work/check/tether.yaml), with the example
# policies plus 10,000 generated ones (one permit per agent, each with a
# `when`). It times `tether run` to `/readyz` 200, then five `POST /reload`
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
LISTEN=$(port "$DIR/tether.yaml" 1) ADMIN=$(port "$DIR/tether.yaml" 2)

start_upstream
trap 'kill -INT $PROXY 2>/dev/null; kill $UPSTREAM 2>/dev/null; wait 2>/dev/null' EXIT
START=$(date +%s%N)
start_tether "$DIR/tether.yaml" "$ADMIN"
echo "start to ready with $(grep -c '^@id' "$DIR"/policies/*.cedar | awk -F: '{s+=$2} END {print s}') policies: $((($(date +%s%N) - START) / 1000000)) ms"

"$OHA" --no-tui -z 8s -q 500 -c 8 --worker-threads 1 --cacert $WORK/certs/ca.pem \
    --cert $WORK/certs/agent.pem --key $WORK/certs/agent-key.pem --output-format json \
    -o "$DIR/oha.json" "https://127.0.0.1:$LISTEN/v1/repos/tether/issues" > /dev/null 2>&1 &
LOAD=$!
sleep 1
for i in 1 2 3 4 5; do
    curl -s -o "$DIR/reload.json" -w "reload $i: HTTP %{http_code} in %{time_total} s: " \
        -X POST "http://127.0.0.1:$ADMIN/reload"
    cat "$DIR/reload.json"; echo
    sleep 0.5
done
wait $LOAD
python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print('responses during the reloads:', \
d['statusCodeDistribution'], '(an aborted request is one oha cut at its deadline)', d['errorDistribution'])" "$DIR/oha.json"
