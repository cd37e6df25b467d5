#!/usr/bin/env bash
# Starts the AWS emulators the integration tests use, on free loopback ports, and stops them.
#
#   scripts/emulators.sh start DIR   installs (npm ci; moto into a virtualenv from the hashed
#                                    tests/emulators/requirements.txt) and starts kinesis-local,
#                                    kinesalite, dynalite, s3rver and moto's S3; waits until each
#                                    answers; writes the endpoints as shell exports to DIR/env
#                                    and the pids to DIR/pids
#   scripts/emulators.sh stop DIR    stops exactly the processes start recorded
#
# Tests read SHARDFLOW_KINESIS_ENDPOINT, SHARDFLOW_KINESALITE_ENDPOINT,
# SHARDFLOW_DYNAMODB_ENDPOINT, SHARDFLOW_S3_ENDPOINT (s3rver) and SHARDFLOW_MOTO_S3_ENDPOINT
# (moto's server, which enforces S3's conditional writes; s3rver ignores them); each test uses
# its own names.
# SHARDFLOW_KINESIS_FAST_CLOCK_ENDPOINT is a second kinesis-local whose clock runs 100 times
# faster (libfaketime, Debian package faketime), so that shard iterators expire in 3 s.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
emulators="$root/tests/emulators"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Polls until the endpoint answers HTTP (any status); never a fixed sleep. Bounded: 60 s.
wait_http() {
  local name=$1 url=$2 pid=$3
  for _ in $(seq 1 600); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "emulators: $name (pid $pid) exited during start-up; its log follows" >&2
      cat "$state/$name.log" >&2 || true
      return 1
    fi
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$url" \
      -H 'Content-Type: application/x-amz-json-1.1' -H 'X-Amz-Target: Kinesis_20131202.ListStreams' \
      -d '{}' 2>/dev/null || true)
    if [ -n "$code" ] && [ "$code" != "000" ]; then
      return 0
    fi
    sleep 0.1
  done
  echo "emulators: $name did not answer at $url within 60 s" >&2
  return 1
}

start() {
  state=$1
  mkdir -p "$state"
  : > "$state/pids"
  if [ ! -d "$emulators/node_modules" ] || [ "$emulators/package-lock.json" -nt "$emulators/node_modules" ]; then
    (cd "$emulators" && npm ci --no-audit --no-fund --loglevel=error >"$state/npm.log" 2>&1) || {
      cat "$state/npm.log" >&2
      exit 1
    }
  fi
  local venv="$emulators/.venv"
  if [ ! -x "$venv/bin/moto_server" ] || [ "$emulators/requirements.txt" -nt "$venv/bin/moto_server" ]; then
    rm -rf "$venv"
    { python3 -m venv "$venv" &&
      "$venv/bin/pip" install --quiet --require-hashes --no-deps -r "$emulators/requirements.txt" &&
      touch "$venv/bin/moto_server"; } >"$state/pip.log" 2>&1 || {
      cat "$state/pip.log" >&2
      exit 1
    }
  fi
  local kinesis kinesis_tls kinesalite dynamo s3 fast fast_tls moto
  kinesis=$(free_port); kinesis_tls=$(free_port); kinesalite=$(free_port)
  dynamo=$(free_port); s3=$(free_port); fast=$(free_port); fast_tls=$(free_port); moto=$(free_port)
  local faketime_lib=/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1
  if [ ! -f "$faketime_lib" ]; then
    echo "emulators: $faketime_lib is missing: apt-get install faketime" >&2
    return 1
  fi

  # kinesis-local reads server.json from its working directory: start it from its package.
  (cd "$emulators/node_modules/kinesis-local" && \
    KINESIS_MOCK_PLAIN_PORT=$kinesis KINESIS_MOCK_TLS_PORT=$kinesis_tls \
    CREATE_STREAM_DURATION=0ms DELETE_STREAM_DURATION=0ms SPLIT_SHARD_DURATION=0ms \
    MERGE_SHARDS_DURATION=0ms UPDATE_SHARD_COUNT_DURATION=0ms SHARD_LIMIT=200 LOG_LEVEL=WARN \
    exec node main.js >"$state/kinesis-local.log" 2>&1) &
  echo $! >>"$state/pids"; local kinesis_pid=$!

  (cd "$emulators/node_modules/kinesis-local" && \
    LD_PRELOAD=$faketime_lib FAKETIME="+0 x100" FAKETIME_NO_CACHE=1 \
    KINESIS_MOCK_PLAIN_PORT=$fast KINESIS_MOCK_TLS_PORT=$fast_tls \
    CREATE_STREAM_DURATION=0ms DELETE_STREAM_DURATION=0ms LOG_LEVEL=ERROR \
    exec node main.js >"$state/kinesis-local-fast-clock.log" 2>&1) &
  echo $! >>"$state/pids"; local fast_pid=$!

  "$emulators/node_modules/.bin/kinesalite" --port "$kinesalite" --createStreamMs 0 \
    --deleteStreamMs 0 --updateStreamMs 0 --shardLimit 200 >"$state/kinesalite.log" 2>&1 &
  echo $! >>"$state/pids"; local kinesalite_pid=$!

  "$emulators/node_modules/.bin/dynalite" --port "$dynamo" --host 127.0.0.1 --createTableMs 0 \
    --deleteTableMs 0 --updateTableMs 0 >"$state/dynalite.log" 2>&1 &
  echo $! >>"$state/pids"; local dynamo_pid=$!

  mkdir -p "$state/s3"
  "$emulators/node_modules/.bin/s3rver" -d "$state/s3" -a 127.0.0.1 -p "$s3" --silent \
    >"$state/s3rver.log" 2>&1 &
  echo $! >>"$state/pids"; local s3_pid=$!

  "$venv/bin/moto_server" -H 127.0.0.1 -p "$moto" >"$state/moto.log" 2>&1 &
  echo $! >>"$state/pids"; local moto_pid=$!

  wait_http kinesis-local "http://127.0.0.1:$kinesis/" "$kinesis_pid"
  wait_http kinesis-local-fast-clock "http://127.0.0.1:$fast/" "$fast_pid"
  wait_http kinesalite "http://127.0.0.1:$kinesalite/" "$kinesalite_pid"
  wait_http dynalite "http://127.0.0.1:$dynamo/" "$dynamo_pid"
  wait_http s3rver "http://127.0.0.1:$s3/" "$s3_pid"
  wait_http moto "http://127.0.0.1:$moto/" "$moto_pid"

  cat >"$state/env" <<ENV
export SHARDFLOW_KINESIS_ENDPOINT=http://127.0.0.1:$kinesis
export SHARDFLOW_KINESALITE_ENDPOINT=http://127.0.0.1:$kinesalite
export SHARDFLOW_KINESIS_FAST_CLOCK_ENDPOINT=http://127.0.0.1:$fast
export SHARDFLOW_DYNAMODB_ENDPOINT=http://127.0.0.1:$dynamo
export SHARDFLOW_S3_ENDPOINT=http://127.0.0.1:$s3
export SHARDFLOW_MOTO_S3_ENDPOINT=http://127.0.0.1:$moto
ENV
  echo "emulators: kinesis-local :$kinesis (fast clock :$fast), kinesalite :$kinesalite, dynalite :$dynamo, s3rver :$s3, moto :$moto"
}

stop() {
  state=$1
  [ -f "$state/pids" ] || return 0
  while read -r pid; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done <"$state/pids"
  # Give them a moment to exit, then make sure.
  for _ in $(seq 1 50); do
    local alive=0
    while read -r pid; do
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && alive=1
    done <"$state/pids"
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  while read -r pid; do
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
  done <"$state/pids"
  rm -f "$state/pids"
}

case "${1:-}" in
  start) start "${2:?state directory}" ;;
  stop) stop "${2:?state directory}" ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
