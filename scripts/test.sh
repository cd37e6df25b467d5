#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit, conformance and integration tests.
# Installs what it needs (cargo crates from Cargo.lock, npm emulators from
# tests/emulators/package-lock.json, moto from tests/emulators/requirements.txt) and starts the emulators on free loopback ports, stopping
# them on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (all targets and features, warnings are errors)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

state="$(mktemp -d)"
cleanup() {
  scripts/emulators.sh stop "$state" || true
  rm -rf "$state"
}
trap cleanup EXIT
if [ ! -f /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]; then
  echo "== installing faketime (Debian) for the fast-clock Kinesis emulator"
  apt-get install -y -q faketime >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q faketime >/dev/null; }
fi
echo "== emulators (kinesis-local, kinesalite, dynalite, s3rver, moto)"
scripts/emulators.sh start "$state"
# shellcheck disable=SC1091
source "$state/env"

echo "== cargo test (workspace, all targets and features)"
cargo test --workspace --all-targets --all-features --locked

echo "== doc tests"
cargo test --workspace --all-features --doc --locked

echo "== fuzz the KPL de-aggregator (needs nightly; skipped with a message otherwise)"
scripts/fuzz.sh 20
