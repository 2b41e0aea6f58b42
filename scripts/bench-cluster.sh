#!/usr/bin/env bash
# Benchmarks a local 3-node cluster (`quiver dev --nodes 3`, N=3 R=2 W=2): for each
# durability mode, starts the cluster on a fresh directory, runs `quiver bench` mixed, write
# and read workloads through the routing client, and stops the cluster.
# Usage: scripts/bench-cluster.sh [DURATION_SECS] [CLIENTS] [MODES...]   (builds release)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
clients=${2:-32}
shift $(( $# > 2 ? 2 : $# ))
modes=${*:-buffered sync}
bin=${QUIVER_BIN:-target/release/quiver}
cargo build --release --bin quiver >/dev/null
port=7580
for mode in $modes; do
  dir=$(mktemp -d)
  "$bin" dev --nodes 3 --dir "$dir/c" --base-port "$port" --durability "$mode" >"$dir/out" 2>"$dir/err" &
  pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT
  until grep -q QUIVER_KEY "$dir/out" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { cat "$dir/err"; exit 1; }
    sleep 0.1
  done
  eval "$(cat "$dir/out")"
  export QUIVER_CLUSTER QUIVER_CA QUIVER_KEY
  for workload in mixed write read; do
    echo "== 3 nodes, durability $mode, workload $workload"
    "$bin" bench --workload "$workload" --duration "$duration" --clients "$clients" 2>/dev/null
  done
  kill -INT $pid; wait $pid || true
  rm -rf "$dir"
  port=$((port + 10))
done
