#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a bounded time from the committed seeds. Any crash
# fails the run, and libFuzzer prints the input (saved under fuzz/artifacts/<target>/): minimise
# it (`cargo fuzz tmin`), fix the bug, and commit it under fuzz/regressions/<target>/, which
# `cargo test --test fuzz_regressions` replays.
#
# Stable toolchain, no sanitizer: the code under test forbids `unsafe`, so AddressSanitizer
# (nightly-only, or RUSTC_BOOTSTRAP=1) would mostly slow the run down; overflow checks and
# debug assertions stay on, which is where a panic on hostile input comes from.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS_PER_TARGET:-40}
flags=(--sanitizer none --debug-assertions)
# CI clones afresh each run: a target directory outside the clone keeps the instrumented
# dependencies (most of the build) between runs on the same machine.
if [ -n "${CAPGATE_FUZZ_TARGET_DIR:-}" ]; then
  flags+=(--target-dir "$CAPGATE_FUZZ_TARGET_DIR")
fi

# The PostgreSQL regression SQL is read in place as extra classifier seeds, never copied.
shared=${CAPGATE_SHARED_DATA:-$(cd .. && pwd)/../shared/data}
regress="$shared/postgres-regress-18"
if [ -d "$regress" ]; then
  sql_seeds=("$regress")
else
  echo "!!! $regress is missing: sql_classify starts from its committed seeds only" >&2
  if [ "${CI:-}" = true ]; then exit 1; fi
  sql_seeds=()
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --version 0.13.2 --locked
fi

start=$(date +%s)
cargo fuzz build "${flags[@]}"
echo "fuzz build: $(($(date +%s) - start)) s"

for target in $(cargo fuzz list); do
  work=$(mktemp -d)
  mkdir -p "$work/corpus"
  # New inputs go to the scratch directory (first); the committed seeds are only read.
  seeds=("corpus/$target")
  if [ "$target" = sql_classify ]; then seeds+=("${sql_seeds[@]}"); fi
  status=0
  cargo fuzz run "${flags[@]}" "$target" "$work/corpus" "${seeds[@]}" -- \
    -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$work/log" 2>&1 || status=$?
  grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb)' "$work/log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$work/log" >&2
    echo "fuzz target $target found a crash (exit $status); input under fuzz/artifacts/$target/" >&2
    exit 1
  fi
  rm -rf "$work"
  echo "fuzz target $target: no crash in ${seconds} s"
done
echo "fuzzing: $(($(date +%s) - start)) s in all"
