#!/usr/bin/env bash
# Builds Tether with profile-guided optimization, and the bare pingora
# proxy the same way so the load test still compares like with like:
#
#   python3 loadtest/run.py --quick            # once: certificates, oha, rotel
#   bash scripts/pgo-build.sh                  # about twice a release build
#   python3 loadtest/run.py --tether-bin target/pgo/use/release/tether
#
# 1. an instrumented release build (-Cprofile-generate);
# 2. training: the load test's own setup at 32 connections
#    (loadtest/profile.sh), Tether with and without span export and the
#    bare proxy, 12 s each;
# 3. the counts merged with llvm-profdata from the LLVM rustc is built on
#    (Debian's llvm-N, installed when missing: profiles are read only by
#    the LLVM major version that wrote them);
# 4. the release build again, laid out by those counts (-Cprofile-use).
#
# The binaries are target/pgo/use/release/tether and
# target/pgo/use/release/examples/bare_mtls (the load test finds the bare
# proxy beside the Tether it is given). The profile is named by its hash, so
# new training always rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."

llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
profdata=/usr/lib/llvm-$llvm/bin/llvm-profdata
if [ ! -x "$profdata" ]; then
    echo "pgo: installing llvm-$llvm for llvm-profdata"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "llvm-$llvm" > /dev/null
fi
[ -e loadtest/work/check/tether.yaml ] || {
    echo "pgo: run python3 loadtest/run.py --quick first (training reuses its setup)" >&2
    exit 1
}

out=$PWD/target/pgo
build() { # RUSTFLAGS, target directory
    RUSTFLAGS="$1" CARGO_TARGET_DIR="$2" cargo build --release --locked -q \
        -p tether --bin tether --example bare_mtls
}

echo "pgo: instrumented build"
rm -rf "$out/raw" && mkdir -p "$out/raw"
build "-Cprofile-generate=$out/raw" "$out/gen"

echo "pgo: training"
for target in tether tether-nospans pingora; do
    TETHER_BIN=$out/gen/release/tether BARE_BIN=$out/gen/release/examples/bare_mtls \
        bash loadtest/profile.sh "$target" > "$out/training-$target.txt"
    head -2 "$out/training-$target.txt"
done

"$profdata" merge -o "$out/merged.profdata" "$out"/raw/*.profraw
profile=$out/tether-$(sha256sum "$out/merged.profdata" | cut -c1-16).profdata
mv "$out/merged.profdata" "$profile"

echo "pgo: optimized build with $(basename "$profile")"
build "-Cprofile-use=$profile" "$out/use"
echo "pgo: built $out/use/release/tether and $out/use/release/examples/bare_mtls"
