#!/usr/bin/env bash
# Freshness benchmark: produce to Kafka at a steady rate and measure, per probed event, the time
# until GET /v1/users/{id}?min_as_of_ms= reflects it. Prints p50 / p99 / max per rate.
#
#   scripts/bench-freshness.sh            rates 10000 and max, 20 s each
#   RATES="5000 10000" SECONDS_EACH=30 WORKERS=2 PARTITIONS=2 scripts/bench-freshness.sh
#
# Starts its own in-memory tansu broker and `persona run` on free ports; stops both at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

RATES=${RATES:-"10000 max"}
SECONDS_EACH=${SECONDS_EACH:-20}
WORKERS=${WORKERS:-2}
PARTITIONS=${PARTITIONS:-$WORKERS}
DIR=target/bench/freshness
mkdir -p "$DIR"

scripts/kafka.sh install >/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
KAFKA_PORT=$(free_port)
HTTP_PORT=$(free_port)
export KAFKA_ADDR=127.0.0.1:$KAFKA_PORT KAFKA_DIR=$DIR/kafka KAFKA_STORAGE=memory KAFKA_PARTITIONS=$PARTITIONS

cargo build --release --quiet
cargo bench --no-run --quiet --bench freshness 2>/dev/null
BENCH=$(ls -t target/release/deps/freshness-* | grep -v '\.d$' | head -1)

cleanup() {
  [[ -n "${ENGINE_PID:-}" ]] && kill "$ENGINE_PID" 2>/dev/null && wait "$ENGINE_PID" 2>/dev/null || true
  scripts/kafka.sh stop >/dev/null || true
}
trap cleanup EXIT

scripts/kafka.sh start >/dev/null
scripts/kafka.sh topics config/kafka.toml >/dev/null

PERSONA_KAFKA_BROKERS=$KAFKA_ADDR PERSONA_HTTP_LISTEN=127.0.0.1:$HTTP_PORT PERSONA_ENGINE_WORKERS=$WORKERS \
  PERSONA_KAFKA_START_OFFSET=latest PERSONA_SOURCE_DEAD_LETTER_PATH=$DIR/dead-letters.jsonl \
  target/release/persona run --config config/kafka.toml >"$DIR/persona.log" 2>&1 &
ENGINE_PID=$!
for _ in $(seq 1 200); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null || { echo "persona did not become ready; see $DIR/persona.log" >&2; exit 1; }

echo "# freshness: produce → GET reflects it; $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# workers $WORKERS, partitions $PARTITIONS, engine tick $(grep -m1 '^tick' config/kafka.toml | cut -d'"' -f2), ${SECONDS_EACH}s per rate, 1 in 20 events probed"
for rate in $RATES; do
  "$BENCH" --brokers "$KAFKA_ADDR" --url "http://127.0.0.1:$HTTP_PORT" --partitions "$PARTITIONS" \
    --rate "$rate" --seconds "$SECONDS_EACH"
done
