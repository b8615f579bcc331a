#!/usr/bin/env bash
# Replay benchmark: generates a synthetic log (default 1M events, 100k users) with
# `persona generate`, replays it with 1 and 2 workers, with recommendations on (the default)
# and off, and prints events/s and peak RSS.
# Figures are printed, never asserted.
#
#   scripts/bench-replay.sh                 # 1M events, 100k users
#   EVENTS=200000 USERS=20000 scripts/bench-replay.sh
#   WORKERS="1 2 4" scripts/bench-replay.sh
#   RECS="on" scripts/bench-replay.sh       # only with recommendations on
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=${EVENTS:-1000000}
USERS=${USERS:-100000}
SPAN=${SPAN:-3d}
WORKERS=${WORKERS:-"1 2"}
RECS=${RECS:-"on off"}
OUT=target/bench
mkdir -p "$OUT"

cargo build --release --quiet
BIN=target/release/persona
LOG="$OUT/events-$EVENTS-$USERS-$SPAN.jsonl"
CATALOG="$OUT/catalog-$USERS.jsonl"
if [ ! -s "$LOG" ] || [ ! -s "$CATALOG" ]; then
  echo "generating $LOG ..." >&2
  "$BIN" generate --out "$LOG" --catalog "$CATALOG" --events "$EVENTS" --users "$USERS" --items $((USERS / 5)) --span "$SPAN"
fi

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "log: $EVENTS events, $USERS users, span $SPAN, $(du -h "$LOG" | cut -f1)"
printf '%-8s %-6s %14s %12s %14s\n' workers recs events/s elapsed_s peak_rss_mib
for recs in $RECS; do
for w in $WORKERS; do
  rm -f "$OUT/dead-$w.jsonl"
  enabled=true; [ "$recs" = on ] || enabled=false
  line=$(PERSONA_RECOMMENDATIONS_ENABLED=$enabled "$BIN" replay --events "$LOG" --catalog "$CATALOG" --workers "$w" --dead-letters "$OUT/dead-$w.jsonl" --dump "$OUT/dump-$w.jsonl" 2>>"$OUT/replay.log")
  rate=$(sed -E 's/.* ([0-9]+) events\/s.*/\1/' <<<"$line")
  secs=$(sed -E 's/.*elapsed ([0-9.]+) s.*/\1/' <<<"$line")
  rss=$(sed -E 's/.*peak RSS ([0-9]+) MiB.*/\1/' <<<"$line")
  printf '%-8s %-6s %14s %12s %14s\n' "$w" "$recs" "$rate" "$secs" "$rss"
done
done
first=$(set -- $WORKERS; echo "$1")
for w in $WORKERS; do
  cmp -s "$OUT/dump-$first.jsonl" "$OUT/dump-$w.jsonl" || echo "WARNING: dump with $w workers differs from $first worker(s)" >&2
done
