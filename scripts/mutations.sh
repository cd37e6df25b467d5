#!/usr/bin/env bash
# Mutation checks of the simulation checker: builds the checker with one rule of the runtime
# broken on purpose at a time (RUSTFLAGS='--cfg shardflow_mutation="<rule>"', in a target
# folder of its own) and expects the checker to fail. Prints one line per rule; exits 1 if
# any mutation went unnoticed. Usage: scripts/mutations.sh [seeds per rule, default 3000]
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-3000}"
missed=0
for rule in readmit_late skip_hold children_first forget_sink_positions forget_advances live_replay \
  steal skip_keyed_guard skip_sink_guard no_generation letters_unguarded admit_garbage_time \
  incomplete_snapshots skip_restore; do
  log="$(mktemp)"
  if RUSTFLAGS="--cfg shardflow_mutation=\"$rule\"" CARGO_TARGET_DIR="target/mutations/$rule" \
    SHARDFLOW_SIM_SEEDS="$seeds" \
    cargo test -q -p shardflow-operators --test simulation random_topologies -- --nocapture \
    >"$log" 2>&1; then
    echo "MISSED  $rule: $seeds seeds passed with the rule broken"
    missed=1
  else
    first="$(grep -m1 -A1 '^seed [0-9]* failed' "$log" | tail -1 | cut -c1-160)"
    failed="$(grep -m1 -o '[0-9]* of [0-9]* seeds failed' "$log" || echo 'the run failed')"
    echo "caught  $rule: $failed;$first"
  fi
  rm -f "$log"
done
exit "$missed"
