#!/usr/bin/env bash
# Fuzzes the KPL de-aggregator for a bounded time (default 30 s) with cargo-fuzz. cargo-fuzz
# needs a nightly toolchain, which cannot be installed here: without one this says so and
# skips. A crash fails the script and leaves its input under fuzz/artifacts/, and so does an
# input that makes the process grow past 256 MiB or ask for more than 64 MiB at once (a hostile
# aggregate must be refused, not decoded into gigabytes).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz: SKIPPED: no nightly toolchain on this machine (cargo-fuzz needs one)"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  if ! cargo +nightly install cargo-fuzz --locked >/tmp/cargo-fuzz-install.log 2>&1; then
    echo "fuzz: SKIPPED: cargo-fuzz did not install (see /tmp/cargo-fuzz-install.log)"
    exit 0
  fi
fi
cd fuzz
cargo +nightly fuzz run deaggregate -- -max_total_time="$seconds" -max_len=65536 \
  -rss_limit_mb=256 -malloc_limit_mb=64
echo "fuzz: deaggregate ran ${seconds}s without a crash"
