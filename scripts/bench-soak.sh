#!/usr/bin/env bash
# Soak benchmark: `persona run` follows a log file that grows at a steady rate, and its RSS is
# printed every few seconds with the events read so far. Memory that grows with events (rather
# than levelling off once windows and horizons have passed) shows here.
#
#   scripts/bench-soak.sh                    3M events over 30 days of event time, 50k events/s
#   EVENTS=10000000 RATE=50000 USERS=100000 SPAN=30d WORKERS=2 EVERY=5 scripts/bench-soak.sh
#   RETENTION=8d scripts/bench-soak.sh       with engine.retention (older detail sealed)
#   ITEMS=20000                              distinct items of the generated log
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=${EVENTS:-3000000}
RATE=${RATE:-50000}
USERS=${USERS:-100000}
ITEMS=${ITEMS:-20000}
SPAN=${SPAN:-30d}
WORKERS=${WORKERS:-2}
EVERY=${EVERY:-5}
RETENTION=${RETENTION:-}
DIR=target/bench/soak
rm -rf "$DIR"
mkdir -p "$DIR"
cargo build --release --quiet
BIN=${BIN:-target/release/persona}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

$BIN generate --out "$DIR/all.jsonl" --events "$EVENTS" --users "$USERS" --items "$ITEMS" --span "$SPAN" --seed 3 >/dev/null
split -l "$RATE" -d -a 5 "$DIR/all.jsonl" "$DIR/chunk-"
: >"$DIR/followed.jsonl"
cat >"$DIR/soak.toml" <<TOML
[engine]
workers = $WORKERS
clock = "event"
retention = "$RETENTION"
erasure_log = "$DIR/erasures.jsonl"
[source]
path = "$DIR/followed.jsonl"
catalog_path = ""
follow = true
dead_letter_path = "$DIR/dead-letters.jsonl"
[triggers]
sink = "none"
[recommendations]
enabled = false
TOML
PORT=$(free_port)
PERSONA_HTTP_LISTEN=127.0.0.1:$PORT $BIN run --config "$DIR/soak.toml" >"$DIR/persona.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; kill $WRITER 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1; do sleep 0.1; done

# One chunk (RATE lines) a second.
( for c in "$DIR"/chunk-*; do cat "$c" >>"$DIR/followed.jsonl"; sleep 1; done ) &
WRITER=$!

echo "# soak: $EVENTS events from $USERS users and $ITEMS items over $SPAN of event time, appended at $RATE lines/s; $WORKERS workers, recommendations off, retention ${RETENTION:-off}; $(nproc) cores"
echo "| elapsed | events read | RSS | peak RSS | event ids held |"
echo "|---:|---:|---:|---:|---:|"
start=$(date +%s)
while :; do
  sleep "$EVERY"
  read_so_far=$(curl -sf "http://127.0.0.1:$PORT/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["counters"]["events_in"])')
  rss=$(awk '/VmRSS/{printf "%d", $2/1024}' /proc/$PID/status)
  hwm=$(awk '/VmHWM/{printf "%d", $2/1024}' /proc/$PID/status)
  ids=$(curl -sf "http://127.0.0.1:$PORT/metrics" | awk '/^persona_names\{table="event_ids"\}/{print $2}')
  echo "| $(( $(date +%s) - start )) s | $read_so_far | $rss MiB | $hwm MiB | $ids |"
  if ! kill -0 "$WRITER" 2>/dev/null && [[ "$read_so_far" -ge "$EVENTS" ]]; then break; fi
done
