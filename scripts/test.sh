#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit, conformance and integration tests.
# Installs what it needs (cargo crates from the lockfile); later issues add the npm emulators
# (kinesis-local, dynalite, s3rver) here, started on free loopback ports and stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test (workspace, all targets)"
cargo test --workspace --all-targets --locked

echo "== doc tests"
cargo test --workspace --doc --locked
