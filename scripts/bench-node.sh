#!/usr/bin/env bash
# Benchmarks one local node: for each durability mode, starts `quiver server` on a fresh
# data directory, runs `quiver bench` write, read and mixed workloads, and stops the node.
# Usage: scripts/bench-node.sh [DURATION_SECS] [CLIENTS]     (builds the release binary)
#        QUIVER_BIN=path/to/quiver scripts/bench-node.sh ...  (benchmarks that binary instead,
#        e.g. an older build kept for a before/after comparison)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
clients=${2:-32}
if [ -n "${QUIVER_BIN:-}" ]; then
  bin=$QUIVER_BIN
else
  bin=target/release/quiver
  cargo build --release --bin quiver >/dev/null
fi
port=7490
for mode in buffered sync; do
  dir=$(mktemp -d)
  "$bin" server --data-dir "$dir" --listen "127.0.0.1:$port" --durability "$mode" >"$dir/out" 2>"$dir/err" &
  pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT
  until grep -q listening "$dir/out" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { cat "$dir/err"; exit 1; }
    sleep 0.1
  done
  for workload in write read mixed; do
    echo "== durability $mode, workload $workload"
    QUIVER_CLUSTER=127.0.0.1:$port QUIVER_CA=$dir/ca.pem QUIVER_KEY=$(cat "$dir/admin.key") \
      "$bin" bench --workload "$workload" --duration "$duration" --clients "$clients" 2>/dev/null
  done
  kill $pid; wait $pid || true
  rm -rf "$dir"
  port=$((port + 1))
done
