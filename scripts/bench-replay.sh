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
#   scripts/bench-replay.sh --cluster       # processes x workers: 1x1, 1x2, 2x1 (LAYOUTS=...)
#   CLUSTER_PORT=2201 scripts/bench-replay.sh --cluster   # first timely port (HTTP: +100)
#
# --cluster replays the log with timely's cluster mode on loopback: each process of a PxW
# layout reads its share of the log and its workers exchange events with the others' over
# TCP, as a multi-machine cluster would. The rate is the log's events over the slowest
# process's elapsed time (from the moment all processes are connected). The merged dumps
# must equal the 1x1 dump.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=0
if [ "${1:-}" = --cluster ]; then CLUSTER=1; fi

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

field() { sed -E "s/$1/\1/" <<<"$2"; }

if [ "$CLUSTER" = 1 ]; then
  LAYOUTS=${LAYOUTS:-"1x1 1x2 2x1"}
  PORT=${CLUSTER_PORT:-2201}
  printf '%-8s %-6s %14s %12s %14s\n' layout recs events/s elapsed_s peak_rss_mib
  for recs in $RECS; do
  enabled=true; [ "$recs" = on ] || enabled=false
  for layout in $LAYOUTS; do
    p=${layout%x*}; w=${layout#*x}
    rm -f "$OUT"/cluster-dump-"$layout"-*.jsonl
    addresses="" http=""
    for ((i = 0; i < p; i++)); do
      addresses+="${addresses:+,}\"127.0.0.1:$((PORT + i))\""
      http+="${http:+,}\"127.0.0.1:$((PORT + 100 + i))\""
    done
    pids=()
    for ((i = 0; i < p; i++)); do
      if [ "$p" = 1 ]; then
        env PERSONA_RECOMMENDATIONS_ENABLED=$enabled "$BIN" replay --events "$LOG" --catalog "$CATALOG" --workers "$w" \
          --dead-letters "$OUT/cluster-dead-$layout-$i.jsonl" --dump "$OUT/cluster-dump-$layout-$i.jsonl" \
          >"$OUT/cluster-$layout-$i.out" 2>>"$OUT/replay.log" &
      else
        env PERSONA_RECOMMENDATIONS_ENABLED=$enabled PERSONA_CLUSTER_ADDRESSES="[$addresses]" PERSONA_CLUSTER_HTTP="[$http]" \
          PERSONA_CLUSTER_WORKERS="[$(printf "$w,%.0s" $(seq "$p") | sed 's/,$//')]" \
          "$BIN" replay --events "$LOG" --catalog "$CATALOG" --process "$i" \
          --dead-letters "$OUT/cluster-dead-$layout-$i.jsonl" --dump "$OUT/cluster-dump-$layout-$i.jsonl" \
          >"$OUT/cluster-$layout-$i.out" 2>>"$OUT/replay.log" &
      fi
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    secs=0; rss=0
    for ((i = 0; i < p; i++)); do
      line=$(grep '^replayed' "$OUT/cluster-$layout-$i.out")
      secs=$(python3 -c "print(max($secs, $(field '.*elapsed ([0-9.]+) s.*' "$line")))")
      rss=$(python3 -c "print(max($rss, $(field '.*peak RSS ([0-9]+) MiB.*' "$line")))")
    done
    rate=$(python3 -c "print(round($EVENTS / $secs))")
    printf '%-8s %-6s %14s %12s %14s\n' "$layout" "$recs" "$rate" "$secs" "$rss"
    LC_ALL=C sort -m "$OUT"/cluster-dump-"$layout"-*.jsonl >"$OUT/cluster-dump-$layout.merged"
    cmp -s "$OUT/cluster-dump-1x1.merged" "$OUT/cluster-dump-$layout.merged" \
      || echo "WARNING: the $layout dump differs from the 1x1 dump" >&2
  done
  done
  exit 0
fi
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
