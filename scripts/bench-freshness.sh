#!/usr/bin/env bash
# Freshness benchmark: produce to Kafka at a steady rate and measure, per probed event, the time
# until GET /v1/users/{id}?min_as_of_ms= reflects it. Prints p50 / p99 / max per rate, after a
# "broker only" row: the same production read back by a plain consumer (the floor).
#
#   scripts/bench-freshness.sh            rates 10000, 25000 and 50000 events/s, 15 s each
#   RATES="5000 10000" SECONDS_EACH=10 WORKERS=2 PARTITIONS=2 scripts/bench-freshness.sh
#
# Every row gets a fresh in-memory tansu broker (and a fresh `persona run`) on free ports:
# tansu's in-memory storage slows down as a topic grows (at 10k events/s its own produce →
# consume p99 goes from 27 ms in the first 15 s to 460 ms after 30 s and seconds after 45 s),
# so longer runs measure the broker, not persona.
set -euo pipefail
cd "$(dirname "$0")/.."

RATES=${RATES:-"10000 25000 50000"}
SECONDS_EACH=${SECONDS_EACH:-15}
WORKERS=${WORKERS:-2}
PARTITIONS=${PARTITIONS:-$WORKERS}
DIR=target/bench/freshness
mkdir -p "$DIR"

scripts/kafka.sh install >/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export KAFKA_DIR=$DIR/kafka KAFKA_STORAGE=memory KAFKA_PARTITIONS=$PARTITIONS

cargo build --release --quiet
cargo bench --no-run --quiet --bench freshness 2>/dev/null
BENCH=$(ls -t target/release/deps/freshness-* | grep -v '\.d$' | head -1)

ENGINE_PID=
stop_all() {
  if [[ -n "$ENGINE_PID" ]]; then kill "$ENGINE_PID" 2>/dev/null || true; wait "$ENGINE_PID" 2>/dev/null || true; ENGINE_PID=; fi
  scripts/kafka.sh stop >/dev/null 2>&1 || true
}
trap stop_all EXIT

fresh_broker() {
  stop_all
  export KAFKA_ADDR=127.0.0.1:$(free_port)
  scripts/kafka.sh start >/dev/null
  scripts/kafka.sh topics config/kafka.toml >/dev/null
}

start_engine() {
  HTTP_PORT=$(free_port)
  PERSONA_KAFKA_BROKERS=$KAFKA_ADDR PERSONA_HTTP_LISTEN=127.0.0.1:$HTTP_PORT PERSONA_ENGINE_WORKERS=$WORKERS \
    PERSONA_KAFKA_START_OFFSET=latest PERSONA_SOURCE_DEAD_LETTER_PATH=$DIR/dead-letters.jsonl \
    target/release/persona run --config config/kafka.toml >"$DIR/persona.log" 2>&1 &
  ENGINE_PID=$!
  for _ in $(seq 1 200); do
    curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "persona did not become ready; see $DIR/persona.log" >&2
  exit 1
}

echo "# freshness: produce → GET reflects it; $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# broker, engine ($WORKERS workers, $PARTITIONS partitions, tick $(grep -m1 '^tick' config/kafka.toml | cut -d'"' -f2)) and load generator share the machine;"
echo "# ${SECONDS_EACH}s per row, producer linger.ms 5; persona rows time 1 in 20 events, broker rows all"
for rate in $RATES; do
  fresh_broker
  "$BENCH" --broker-only --brokers "$KAFKA_ADDR" --partitions "$PARTITIONS" --rate "$rate" --seconds "$SECONDS_EACH"
  fresh_broker
  start_engine
  "$BENCH" --brokers "$KAFKA_ADDR" --url "http://127.0.0.1:$HTTP_PORT" --partitions "$PARTITIONS" \
    --rate "$rate" --seconds "$SECONDS_EACH"
done
