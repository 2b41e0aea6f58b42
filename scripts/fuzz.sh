#!/usr/bin/env bash
# Bounded fuzzing of every decoder fed by the network or disk (fuzz/, cargo-fuzz + libFuzzer).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 20 s, every target)
#
# Installs the pinned cargo-fuzz if missing, builds all targets in one cargo invocation,
# then runs each for SECONDS_PER_TARGET against a scratch copy of its committed seed corpus
# (fuzz/corpus/<target>/ is never written). Prints executions and crashes per target and
# exits non-zero if any target crashed; crash inputs are kept in fuzz/artifacts/<target>/.
# Writes only under fuzz/ (target/, corpus-run/, artifacts/; all git-ignored).
#
# Reproduce a crash:  fuzz/target/x86_64-unknown-linux-gnu/release/TARGET fuzz/artifacts/TARGET/crash-...
# Minimise it:        RUSTC_BOOTSTRAP=1 cargo fuzz tmin --fuzz-dir fuzz $FUZZ_BUILD_FLAGS TARGET ARTIFACT
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${1:-20}"
shift || true

CARGO_FUZZ_VERSION="0.13.2"
TRIPLE="x86_64-unknown-linux-gnu"
# cargo-fuzz passes nightly-only flags (-Zsanitizer, -Cpasses=sancov-module); the pinned
# stable toolchain (rust-toolchain.toml) accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never
# What cargo-fuzz itself sets at run time.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"
# Extra `cargo fuzz build` flags. Its default is release with debug assertions and
# AddressSanitizer (see fuzz/Cargo.toml for the profile); e.g. FUZZ_BUILD_FLAGS="-s none".
read -r -a BUILD_FLAGS <<< "${FUZZ_BUILD_FLAGS:-}"

if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "=$CARGO_FUZZ_VERSION" --locked
fi

# cargo fuzz has no --locked: refuse a stale fuzz/Cargo.lock before it could be rewritten.
if ! cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml > /dev/null; then
    echo "fuzz/Cargo.lock is out of date (a dependency of quiver-core/-sdk/-node changed):" >&2
    echo "run 'cargo metadata --format-version 1 --manifest-path fuzz/Cargo.toml > /dev/null'" >&2
    echo "and commit fuzz/Cargo.lock (it keeps the versions of the root Cargo.lock)" >&2
    exit 1
fi

if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
else
    # `seeds` is the seed generator, not a target.
    mapfile -t TARGETS < <(cargo fuzz list --fuzz-dir fuzz | grep -vx seeds)
fi

echo "== cargo fuzz build (${#TARGETS[@]} targets: ${TARGETS[*]})"
start=$(date +%s)
cargo fuzz build --fuzz-dir fuzz ${BUILD_FLAGS[@]+"${BUILD_FLAGS[@]}"}
echo "built in $(( $(date +%s) - start )) s"

bin_dir="fuzz/target/$TRIPLE/release"
case " ${BUILD_FLAGS[*]-} " in
    *" --dev "* | *" -D "*) bin_dir="fuzz/target/$TRIPLE/debug" ;;
esac

failed=0
summary=()
for t in "${TARGETS[@]}"; do
    corpus="fuzz/corpus-run/$t"
    artifacts="fuzz/artifacts/$t"
    log="fuzz/artifacts/$t.log"
    # A run replaces the previous run's scratch corpus and crash inputs of the target.
    rm -rf "$corpus" "$artifacts"
    mkdir -p "$corpus" "$artifacts"
    if [ -d "fuzz/corpus/$t" ]; then
        cp -R "fuzz/corpus/$t/." "$corpus/"
    fi
    echo "== fuzz $t (${SECONDS_PER_TARGET} s)"
    status=0
    # -timeout: one input may take at most 10 s (a hang is a failure); -rss_limit_mb and
    # -malloc_limit_mb: a decoder that allocates without bound is a failure.
    "$bin_dir/$t" "$corpus" \
        -max_total_time="$SECONDS_PER_TARGET" \
        -timeout=10 \
        -rss_limit_mb=2048 \
        -malloc_limit_mb=512 \
        -max_len=65536 \
        -print_final_stats=1 \
        -artifact_prefix="$artifacts/" \
        > "$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    crashes=$(find "$artifacts" -type f | wc -l | tr -d ' ')
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        tail -n 60 "$log"
        echo "FAILED: $t (exit $status); inputs in $artifacts/, log in $log"
    fi
    summary+=("$(printf '%-16s execs %10s  crashes %s  exit %s' "$t" "${execs:-?}" "$crashes" "$status")")
done

echo "== fuzz summary (${SECONDS_PER_TARGET} s per target)"
printf '%s\n' "${summary[@]}"
exit "$failed"
