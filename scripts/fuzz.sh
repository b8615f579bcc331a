#!/usr/bin/env bash
# Fuzzes event parsing, config parsing and the HTTP router's input handling with cargo-fuzz
# (libFuzzer + AddressSanitizer). Exits non-zero on a finding; the crashing input is kept under
# fuzz/artifacts/TARGET/ (replay it: cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60; CI runs 20)
#   FUZZ_DEV=1 scripts/fuzz.sh 20            unoptimised build: about half the build time, fewer
#                                            runs a second (CI uses it)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
# libFuzzer's instrumentation needs nightly flags: a nightly toolchain if there is one, else
# the installed one with RUSTC_BOOTSTRAP (the same compiler features, unlocked).
toolchain=()
if rustup run nightly rustc --version >/dev/null 2>&1; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi
targets=(parse_event config router)
build=(-O)
if [[ -n "${FUZZ_DEV:-}" ]]; then
  build=(--dev)
  # Line tables are enough for the sanitizer's reports; full debug info slows the links.
  export CARGO_PROFILE_DEV_DEBUG=line-tables-only
fi
cd fuzz
log=$(mktemp)
if ! cargo "${toolchain[@]}" fuzz build "${build[@]}" --target-dir ../target/fuzz >"$log" 2>&1; then
  grep -E -A12 "^error" "$log" >&2 || tail -40 "$log" >&2
  echo "the fuzz targets do not build" >&2
  exit 1
fi
tail -1 "$log"
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${seconds}s"
  if ! cargo "${toolchain[@]}" fuzz run "${build[@]}" --target-dir ../target/fuzz "$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz target $t found an input that fails (kept under fuzz/artifacts/$t)" >&2
    exit 1
  fi
  grep -E "^Done" "$log" || true
done
rm -f "$log"
echo "fuzzing: no findings"
