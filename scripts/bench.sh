#!/usr/bin/env bash
# Side-by-side benchmark: persona against the peers a team would otherwise run, on the same
# logs, in one run. Prints one Markdown table: events/s, peak RSS and bytes per user per row,
# and whether the row's core features equal persona's. Figures are printed, never asserted.
#
#   scripts/bench.sh                  # logs of 100k, 1M and 10M events, plus the Taobao sample
#   scripts/bench.sh --quick          # 100k events and the Taobao sample only (a few minutes)
#   SIZES="1000000" scripts/bench.sh  # chosen sizes
#   PATHWAY_MAX=100000 REDIS_MAX=1000000 scripts/bench.sh   # the largest log each peer runs
#   DATASETS=/path/to/shared/datasets scripts/bench.sh       # default ../shared/datasets
#   REDIS_PORT=6390 scripts/bench.sh  # the redis row's server port (the default)
#
# Rows (each computes the core features: counts by type, first/last seen, event count, spend,
# distinct items, 30-minute sessions, with de-duplication by event_id):
#   floor          `persona validate`: read and validate every line, no state (1 and 2 threads)
#   persona        `persona replay`, all profile views and the default segments, 1 and 2 workers
#   persona+recs   the same with recommendations on, 2 workers
#   pathway        Pathway (pip, in target/bench/venv-pathway), static mode, 2 threads
#   redis          Redis 7 (Debian redis-server), one Lua script per event, pipelined loader(s)
# Each peer's output is checked against persona's dump (scripts/peers/compare.py).
# Elapsed is wall time from start to the written output, measured by /usr/bin/time for every
# row; peak RSS is the process's (for redis: the server's plus the loader's).
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
[ "${1:-}" = --quick ] && QUICK=1
if [ "$QUICK" = 1 ]; then SIZES=${SIZES:-100000}; else SIZES=${SIZES:-"100000 1000000 10000000"}; fi
PATHWAY_MAX=${PATHWAY_MAX:-1000000}
REDIS_MAX=${REDIS_MAX:-1000000}
PEERS=${PEERS-"pathway redis"}
OUT=target/bench
mkdir -p "$OUT"
[ -x /usr/bin/time ] || { echo "bench: /usr/bin/time is missing (apt-get install time)" >&2; exit 1; }

cargo build --release --quiet
BIN=target/release/persona

# Logs: the generator's (users = events / 10, at most 100k; a span that grows with the log so
# that the 10M log runs well past every window) and the Taobao firehose sample.
logs=()
for n in $SIZES; do
  users=$((n / 10)); [ "$users" -gt 100000 ] && users=100000
  days=$(( n / 333334 )); [ "$days" -lt 3 ] && days=3
  log="$OUT/events-$n-$users-${days}d.jsonl"
  catalog="$OUT/catalog-$users.jsonl"
  if [ ! -s "$log" ] || [ ! -s "$catalog" ]; then
    echo "bench: generating $log ..." >&2
    "$BIN" generate --out "$log" --catalog "$catalog" --events "$n" --users "$users" \
      --items $((users / 5)) --span "${days}d" >&2
  fi
  logs+=("$log|$catalog|generated, $users users, ${days} days")
done
DATASETS=${DATASETS:-../shared/datasets}
if [ -d "$DATASETS/taobao-userbehavior" ]; then
  python3 scripts/convert-datasets.py "$DATASETS" target/datasets >/dev/null
  logs+=("target/datasets/taobao-firehose-events.jsonl|target/datasets/taobao-firehose-catalog.jsonl|Taobao firehose sample")
else
  echo "bench: $DATASETS not found (set DATASETS=DIR), skipping the Taobao rows" >&2
fi

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(free -g | awk '/Mem:/ {print $2}') GiB"
echo
echo "| log | events | row | threads | events/s | elapsed s | peak RSS MiB | bytes/user | same features |"
echo "|---|---|---|---|---|---|---|---|---|"

# measure NAME -- CMD...: runs CMD under /usr/bin/time; sets ELAPSED (s) and RSS_KIB.
measure() {
  local out="$OUT/bench-$1.out" timing="$OUT/bench-$1.time"
  shift 2
  if ! /usr/bin/time -f '%e %M' -o "$timing" "$@" >"$out" 2>>"$OUT/bench.log"; then
    echo "bench: '$*' failed; see $out and $OUT/bench.log" >&2
    ELAPSED=""; RSS_KIB=""
    return 1
  fi
  read -r ELAPSED RSS_KIB <"$timing"
}

# row LOG_LABEL EVENTS NAME THREADS USERS SAME
row() {
  local rate mib per_user
  if [ -z "$ELAPSED" ]; then
    echo "| $1 | $(python3 -c "print(f'{$2:,}')") | $3 | $4 | failed | | | | |"
    return
  fi
  rate=$(python3 -c "print(f'{$2 / max($ELAPSED, 0.001):,.0f}')")
  mib=$((RSS_KIB / 1024))
  per_user=-
  [ "$5" = - ] || per_user=$(python3 -c "print(f'{$RSS_KIB * 1024 / max($5, 1):,.0f}')")
  echo "| $1 | $(python3 -c "print(f'{$2:,}')") | $3 | $4 | $rate | $ELAPSED | $(python3 -c "print(f'{$mib:,}')") | $per_user | $6 |"
}

# The peers' one-time setup (venvs, redis-server) is done here, so that no row times it.
for peer in $PEERS; do
  case $peer in
    pathway | redis) scripts/peers/$peer.sh --setup >&2 || echo "bench: setting up $peer failed" >&2 ;;
  esac
done

for entry in "${logs[@]}"; do
  IFS='|' read -r log catalog label <<<"$entry"
  events=$(wc -l <"$log")
  tag=$(basename "$log" .jsonl)
  label="$label"

  for t in 1 2; do
    measure "$tag-floor-$t" -- "$BIN" validate --events "$log" --workers "$t" || true
    row "$label" "$events" "floor (validate only)" "$t" - -
  done

  dump="$OUT/bench-$tag-persona-2.dump.jsonl"
  users=1
  for t in 1 2; do
    measure "$tag-persona-$t" -- env PERSONA_RECOMMENDATIONS_ENABLED=false RUST_LOG=warn \
      "$BIN" replay --events "$log" --catalog "$catalog" --workers "$t" \
      --dump "$OUT/bench-$tag-persona-$t.dump.jsonl" --dead-letters "$OUT/bench-$tag-dead-$t.jsonl" || true
    users=$(sed -nE 's/.* ([0-9]+) users as of.*/\1/p' "$OUT/bench-$tag-persona-$t.out" | head -1)
    users=${users:-1}
    row "$label" "$events" "persona" "$t" "$users" "reference"
  done
  measure "$tag-persona-recs-2" -- env PERSONA_RECOMMENDATIONS_ENABLED=true RUST_LOG=warn \
    "$BIN" replay --events "$log" --catalog "$catalog" --workers 2 \
    --dump "$OUT/bench-$tag-persona-recs.dump.jsonl" --dead-letters "$OUT/bench-$tag-dead-recs.jsonl" || true
  same=$(python3 scripts/peers/compare.py "$OUT/bench-$tag-persona-recs.dump.jsonl" "$dump" >/dev/null 2>&1 && echo yes || echo NO)
  row "$label" "$events" "persona + recommendations" 2 "$users" "$same"

  for peer in $PEERS; do
    case $peer in
      pathway) max=$PATHWAY_MAX; cmd=(scripts/peers/pathway.sh "$log" "$OUT/bench-$tag-pathway.jsonl" 2); threads=2 ;;
      redis) max=$REDIS_MAX; cmd=(scripts/peers/redis.sh "$log" "$OUT/bench-$tag-redis.jsonl"); threads="1 + loaders" ;;
      *) echo "bench: unknown peer $peer" >&2; continue ;;
    esac
    if [ "$events" -gt "$max" ]; then
      echo "| $label | $(python3 -c "print(f'{$events:,}')") | $peer | $threads | skipped (log over ${peer^^}_MAX=$max) | | | | |"
      continue
    fi
    if measure "$tag-$peer" -- "${cmd[@]}"; then
      if [ "$peer" = redis ]; then
        # The loader's RSS is measured; add the server's, which the script reports.
        server_kib=$(sed -nE 's/.*redis peak RSS ([0-9]+) KiB.*/\1/p' "$OUT/bench-$tag-$peer.out" | tail -1)
        RSS_KIB=$((RSS_KIB + ${server_kib:-0}))
      fi
      same=$(python3 scripts/peers/compare.py "$OUT/bench-$tag-$peer.jsonl" "$dump" >"$OUT/bench-$tag-$peer.compare" 2>&1 && echo yes || echo NO)
    fi
    row "$label" "$events" "$peer" "$threads" "$users" "${same:-}"
  done
done
echo
echo "events/s: the log's lines (duplicates and invalid lines included) over the wall time from start to written output."
echo "bytes/user: peak RSS over the users in the log. same features: the row's per-user core features equal persona's 2-worker dump."
