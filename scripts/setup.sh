#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test Tether.
#   bash scripts/setup.sh          system packages for the build (cmake)
#   bash scripts/setup.sh --tests  also the test peers (the rotel collector)
#                                  and the dependency checks CI runs
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
# pingora's build runs cmake; the rotel collector links libpython3.11.
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
if [ "${1:-}" = "--tests" ]; then
  ldconfig -p 2>/dev/null | grep -q 'libpython3\.11\.so\.1\.0' || missing+=(libpython3.11)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "${1:-}" = "--tests" ]; then
  # The dependency checks CI runs: unused dependencies (cargo-machete) and
  # licenses, sources and duplicate versions (cargo-deny, see deny.toml).
  for tool in cargo-machete@0.9.2 cargo-deny@0.20.2; do
    command -v "${tool%@*}" >/dev/null 2>&1 || {
      echo "setup: installing ${tool%@*}"
      cargo install -q --locked "$tool"
    }
  done
  # A real OpenTelemetry collector for the span-export tests (tests/otel.rs).
  venv=target/tools/venv
  if ! ls $venv/lib/python3*/site-packages/rotel/rotel-agent >/dev/null 2>&1; then
    echo "setup: installing the rotel collector into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check rotel==0.0.1a15
  fi
fi
