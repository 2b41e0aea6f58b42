#!/usr/bin/env bash
# Installs what the fault-injection tests need (host/faults, tests/faults.rs,
# tests/partition.rs): nftables (partitions, packet loss) and libfaketime (clock skew).
# Idempotent and quiet when both are present; needs root (apt-get) only when one is missing.
set -euo pipefail

missing=()
command -v nft >/dev/null 2>&1 || missing+=(nftables)
# The library is what the suite preloads; the `faketime` wrapper alone is not enough.
found=no
for lib in /usr/lib/*/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1; do
    [ -e "$lib" ] && found=yes
done
[ "$found" = yes ] || missing+=(faketime)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "faults-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
