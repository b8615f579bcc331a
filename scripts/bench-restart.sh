#!/usr/bin/env bash
# Restart benchmark: how long `persona run` takes to be ready again after a SIGKILL, with
# 1M events of state in Kafka, from a checkpoint and by re-reading the topics.
#
#   scripts/bench-restart.sh                 1,000,000 events, 2 workers, 2 partitions
#   EVENTS=200000 WORKERS=2 scripts/bench-restart.sh
#   SPAN=30d scripts/bench-restart.sh        the log's time span (default 3d)
#   CLOCK=event RETENTION=8d scripts/bench-restart.sh
#                                            the event clock (the generated events are from
#                                            2023), optionally with a retention
#
# Ready = GET /readyz answers 200: every partition read to its end and the state caught up.
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=${EVENTS:-1000000}
WORKERS=${WORKERS:-2}
SPAN=${SPAN:-3d}
CLOCK=${CLOCK:-live}
RETENTION=${RETENTION:-}
PARTITIONS=${PARTITIONS:-$WORKERS}
DIR=target/bench/restart
rm -rf "$DIR"
mkdir -p "$DIR"

scripts/kafka.sh install >/dev/null
cargo build --release --quiet
BIN=target/release/persona
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# In-memory topics keep the broker out of the figures (tansu reads SQLite at ~10k messages/s).
# A restore must resume at a record batch's start: tansu's in-memory storage answers a fetch
# from inside one with a later batch or nothing. The checkpoint after ready holds the
# partitions' ends, under either clock.
STORAGE=${KAFKA_STORAGE:-memory}
export KAFKA_DIR=$DIR/kafka KAFKA_STORAGE=$STORAGE KAFKA_PARTITIONS=$PARTITIONS
export KAFKA_ADDR=127.0.0.1:$(free_port)

ENGINE_PID=
stop_all() {
  if [[ -n "$ENGINE_PID" ]]; then kill -9 "$ENGINE_PID" 2>/dev/null || true; wait "$ENGINE_PID" 2>/dev/null || true; ENGINE_PID=; fi
  scripts/kafka.sh stop >/dev/null 2>&1 || true
}
trap stop_all EXIT

now_ms() { date +%s%3N; }
LOG=$DIR/events.jsonl
$BIN generate --out "$LOG" --events "$EVENTS" --users $((EVENTS / 10)) --items 20000 --span "$SPAN" --seed 7 >/dev/null
scripts/kafka.sh start >/dev/null
scripts/kafka.sh topics config/kafka.toml >/dev/null
t0=$(now_ms)
$BIN produce --brokers "$KAFKA_ADDR" --topic persona-events --events "$LOG" >/dev/null
echo "# produced $EVENTS events in $(( ($(now_ms) - t0) )) ms"

HTTP_PORT=$(free_port)
start_engine() { # $1: log file
  env PERSONA_KAFKA_BROKERS="$KAFKA_ADDR" PERSONA_HTTP_LISTEN="127.0.0.1:$HTTP_PORT" PERSONA_ENGINE_WORKERS="$WORKERS" \
    PERSONA_ENGINE_CLOCK="$CLOCK" ${RETENTION:+PERSONA_ENGINE_RETENTION="$RETENTION"} \
    PERSONA_ENGINE_CHECKPOINT_DIR=$DIR/checkpoints PERSONA_ENGINE_CHECKPOINT_EVERY=10s \
    PERSONA_ENGINE_ERASURE_LOG=$DIR/erasures.jsonl \
    PERSONA_SOURCE_DEAD_LETTER_PATH=$DIR/dead-letters.jsonl \
    $BIN run --config config/kafka.toml >"$1" 2>&1 &
  ENGINE_PID=$!
}
wait_ready() { # prints ms until ready
  local start=$1
  for _ in $(seq 1 6000); do
    if curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1; then echo $(( $(now_ms) - start )); return; fi
    sleep 0.05
  done
  echo "not ready after 300 s" >&2; exit 1
}
checkpoints_written() {
  curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" | awk '/^persona_checkpoints_total /{print $2}'
}
rss_mib() { awk '/VmHWM/{printf "%d", $2/1024}' "/proc/$ENGINE_PID/status"; }

t0=$(now_ms); start_engine "$DIR/first.log"
cold=$(wait_ready "$t0")
# A checkpoint holding the whole log: one written after ready, or, if none is within two and a
# half rounds (10 s each), the newest (an idle engine skips the rounds that would copy the same).
before=$(checkpoints_written)
for _ in $(seq 1 125); do
  [[ "$(checkpoints_written)" -gt "$before" ]] && break
  sleep 0.2
done
until [[ "$(checkpoints_written)" -gt 0 ]]; do sleep 0.2; done
written=$(grep "checkpoint written" "$DIR/first.log" | tail -1)
bytes=$(sed -E 's/.*bytes=([0-9]+).*/\1/' <<<"$written")
write_ms=$(sed -E 's/.*ms=([0-9]+).*/\1/' <<<"$written")
rss_first=$(rss_mib)
kill -9 "$ENGINE_PID"; wait "$ENGINE_PID" 2>/dev/null || true

t0=$(now_ms); start_engine "$DIR/restore.log"
warm=$(wait_ready "$t0")
rss_restore=$(rss_mib)
grep -q "resuming from checkpoint" "$DIR/restore.log" || { echo "the restart did not resume from a checkpoint; see $DIR/restore.log" >&2; exit 1; }
kill -9 "$ENGINE_PID"; wait "$ENGINE_PID" 2>/dev/null || true

rm -rf "$DIR/checkpoints"
t0=$(now_ms); start_engine "$DIR/reread.log"
reread=$(wait_ready "$t0")
kill -9 "$ENGINE_PID"; wait "$ENGINE_PID" 2>/dev/null || true; ENGINE_PID=

echo "# restart after SIGKILL: $EVENTS events over $SPAN in Kafka, $CLOCK clock${RETENTION:+, retention $RETENTION}, $WORKERS workers, $PARTITIONS partitions, tansu $STORAGE storage; $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "| start | ready after | peak RSS |"
echo "|---|---:|---:|"
echo "| first start (empty checkpoint dir: read all) | $(awk "BEGIN{printf \"%.1f s\", $cold/1000}") | $rss_first MiB |"
echo "| restart from a checkpoint | $(awk "BEGIN{printf \"%.1f s\", $warm/1000}") | $rss_restore MiB |"
echo "| restart without a checkpoint (re-read Kafka) | $(awk "BEGIN{printf \"%.1f s\", $reread/1000}") | |"
held=$(sed -E 's/.* records=([0-9]+).*/\1/' <<<"$written")
sealed=$(sed -E 's/.*sealed_records=([0-9]+).*/\1/' <<<"$written")
sealed_users=$(sed -E 's/.*sealed_users=([0-9]+).*/\1/' <<<"$written")
echo "# checkpoint: $(awk "BEGIN{printf \"%.1f\", $bytes/1048576}") MiB ($held held events and control records, $sealed sealed records, $sealed_users users' sealed basics), written in $write_ms ms (off the workers' threads)"
