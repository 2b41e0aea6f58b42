#!/usr/bin/env bash
# Does a plugin that burns its whole fuel in `update` hold up gets and puts of other keys?
# One node; `quiver bench` (mixed gets and puts on bucket `bench`) runs alone, then while
# BURNERS clients keep calling `update` on a bucket whose reconciler loops until its fuel
# (the node's cap, 10^9 units, a second or more of CPU) is spent; repeated ROUNDS times,
# alternating. Prints each run's figures (ops/s, p50/p99/p99.9 in µs).
#
#   scripts/bench-plugin-isolation.sh [DURATION_S] [CLIENTS] [BURNERS] [ROUNDS]
#   QUIVER_BIN=/path/to/quiver LOOP_WASM=/path/to/fixture_loop.wasm ... to run another build
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
clients=${2:-16}
burners=${3:-4}
rounds=${4:-2}
bin=${QUIVER_BIN:-target/release/quiver}
if [ -z "${QUIVER_BIN:-}" ]; then
  cargo build --release --bin quiver >/dev/null
fi
loop_wasm=${LOOP_WASM:-$(ls -t target/*/build/quiver-guests-*/out/fixture_loop.wasm | head -1)}
dir=$(mktemp -d)
port=7590
"$bin" server --data-dir "$dir" --listen "127.0.0.1:$port" --durability buffered >"$dir/out" 2>"$dir/err" &
pid=$!
burner_pids=()
cleanup() {
  for b in "${burner_pids[@]}"; do kill "$b" 2>/dev/null || true; done
  kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
until grep -q listening "$dir/out" 2>/dev/null; do
  kill -0 $pid 2>/dev/null || { cat "$dir/err"; exit 1; }
  sleep 0.1
done
export QUIVER_CLUSTER=127.0.0.1:$port QUIVER_CA=$dir/ca.pem
# A build from before access keys (QUIVER_BIN=... to compare) writes no admin key.
if [ -f "$dir/admin.key" ]; then export QUIVER_KEY=$(cat "$dir/admin.key"); fi
"$bin" plugin upload burn "$loop_wasm" --force >/dev/null
"$bin" bucket set burn --reconciler burn --plugin-fuel 1000000000 >/dev/null

run() {
  "$bin" bench --workload mixed --duration "$duration" --clients "$clients" --output json 2>/dev/null |
    python3 -c '
import json, sys
r = json.load(sys.stdin)
a = r["all"]
print("%8.0f ops/s  p50 %7d µs  p99 %7d µs  p99.9 %8d µs  errors %d"
      % (a["ops_per_sec"], a["p50_us"], a["p99_us"], a["p999_us"], r["errors"]))'
}

for round in $(seq 1 "$rounds"); do
  echo "round $round, without burners: $(run)"
  burner_pids=()
  for i in $(seq 1 "$burners"); do
    ( while true; do "$bin" update burn "k$i" spin >/dev/null 2>&1 || true; done ) &
    burner_pids+=($!)
  done
  sleep 2
  echo "round $round, with $burners burners:  $(run)"
  for b in "${burner_pids[@]}"; do kill "$b" 2>/dev/null || true; done
  wait "${burner_pids[@]}" 2>/dev/null || true
  burner_pids=()
done
failures=$("$bin" cluster status --output json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["nodes"][0]["plugin_failures"])')
echo "plugin calls that failed (burned their fuel) on the node: $failures"
