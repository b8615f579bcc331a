#!/usr/bin/env bash
# Chaos test: produce a log to Kafka in chunks while `persona run` (checkpointing every 100 ms)
# is killed with SIGKILL at random moments and restarted, ROUNDS times; the broker is killed and
# restarted once, and the newest checkpoint is truncated once. The final profiles must equal
# `persona replay` of the same log. CI runs the same test (tests/chaos.rs) with 4 rounds.
#
#   scripts/chaos.sh [ROUNDS]            default 30
#   CHAOS_SEED=123 scripts/chaos.sh 30     repeat a run (each run prints its seed)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-30}"
scripts/kafka.sh install >/dev/null
CHAOS_ROUNDS="$rounds" RUST_BACKTRACE=0 \
  cargo test --release --test chaos sigkill -- --nocapture 2>&1 | grep -E "^chaos:|^test |panicked|differ|test result" | grep -v "^ *Compiling"
