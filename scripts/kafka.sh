#!/usr/bin/env bash
# A local Kafka-protocol broker (tansu) for development, tests and CI.
#
#   scripts/kafka.sh install          build tansu once into ~/.cargo/bin (~15 min on 2 cores)
#   scripts/kafka.sh start            start it on $KAFKA_ADDR (default 127.0.0.1:9092)
#   scripts/kafka.sh topics [CONFIG]  create the topics CONFIG names (default config/kafka.toml)
#   scripts/kafka.sh stop | status
#
# Environment: KAFKA_ADDR, KAFKA_STORAGE ("sqlite" (default: topics survive a broker restart,
# in $KAFKA_DIR/tansu.db) or "memory"), KAFKA_DIR (default target/kafka: log, pid, database),
# KAFKA_PARTITIONS (events topic partitions, default 4), TANSU (the binary), KAFKA_INSTALL_FAST=1
# (install: a quicker, less optimised build, as CI does).
set -euo pipefail

cd "$(dirname "$0")/.."
ADDR=${KAFKA_ADDR:-127.0.0.1:9092}
DIR=${KAFKA_DIR:-target/kafka}
STORAGE=${KAFKA_STORAGE:-sqlite}
PARTITIONS=${KAFKA_PARTITIONS:-4}
TANSU_VERSION=0.6.0
tansu_bin() {
  if [[ -n "${TANSU:-}" ]]; then echo "$TANSU"; return; fi
  if command -v tansu >/dev/null 2>&1; then command -v tansu; return; fi
  echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
}

install() {
  local bin; bin=$(tansu_bin)
  if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    echo "tansu $TANSU_VERSION: $bin"
    return
  fi
  echo "building tansu $TANSU_VERSION from crates.io (once; about 15 minutes on 2 cores)..."
  local profile=()
  if [[ -n "${KAFKA_INSTALL_FAST:-}" ]]; then
    # For tests only (CI): an unoptimised build without debug info; quicker to build, slower.
    profile=(--debug)
    export CARGO_PROFILE_DEV_DEBUG=0
  fi
  # The default build has no storage engine: dynostore gives memory://, libsql gives sqlite://.
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql "${profile[@]}"
}

pid_alive() { [[ -f "$DIR/tansu.pid" ]] && kill -0 "$(cat "$DIR/tansu.pid")" 2>/dev/null; }

wait_port() {
  local host=${ADDR%:*} port=${ADDR##*:}
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
    pid_alive || { echo "tansu exited; see $DIR/tansu.log" >&2; tail -20 "$DIR/tansu.log" >&2; return 1; }
    sleep 0.1
  done
  echo "tansu is not listening on $ADDR after 10 s; see $DIR/tansu.log" >&2
  return 1
}

start() {
  local bin; bin=$(tansu_bin)
  [[ -x "$bin" ]] || { echo "tansu is not installed: run scripts/kafka.sh install" >&2; exit 1; }
  mkdir -p "$DIR"
  if pid_alive; then echo "tansu already running (pid $(cat "$DIR/tansu.pid")) on $ADDR"; return; fi
  local storage
  case "$STORAGE" in
    sqlite) storage="sqlite://tansu.db" ;;  # relative to $DIR, where tansu runs
    memory) storage="memory://tansu/" ;;
    *) echo "KAFKA_STORAGE=$STORAGE: expected sqlite or memory" >&2; exit 1 ;;
  esac
  (cd "$DIR" && exec nohup "$bin" broker --listener-url "tcp://$ADDR" \
    --advertised-listener-url "tcp://$ADDR" --storage-engine "$storage" >>tansu.log 2>&1) &
  echo $! >"$DIR/tansu.pid"
  wait_port
  echo "tansu running on $ADDR (pid $(cat "$DIR/tansu.pid"), storage $storage, log $DIR/tansu.log)"
}

stop() {
  if pid_alive; then
    local pid; pid=$(cat "$DIR/tansu.pid")
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    echo "tansu stopped"
  else
    echo "tansu is not running"
  fi
  rm -f "$DIR/tansu.pid"
}

topics() {
  local config=${1:-config/kafka.toml} bin; bin=$(tansu_bin)
  # Topic names from the config's [kafka] section (defaults as in config/default.toml).
  local names
  names=$(python3 - "$config" <<'EOF'
import sys, tomllib
k = tomllib.load(open(sys.argv[1], "rb")).get("kafka", {})
for key, default in [("events_topic", "persona-events"), ("catalog_topic", "persona-catalog"),
                     ("dead_letter_topic", "persona-dead-letters")]:
    print(key, k.get(key, default))
EOF
)
  while read -r key name; do
    [[ -n "$name" ]] || continue
    local n=1
    [[ "$key" == events_topic ]] && n=$PARTITIONS
    if "$bin" topic list --broker "tcp://$ADDR" 2>/dev/null | grep -qw -- "$name"; then
      echo "topic $name exists"
    else
      "$bin" topic create "$name" --broker "tcp://$ADDR" --partitions "$n" >/dev/null
      echo "topic $name created ($n partitions)"
    fi
  done <<<"$names"
}

status() {
  if pid_alive; then echo "tansu running (pid $(cat "$DIR/tansu.pid")) on $ADDR"; else echo "tansu is not running"; exit 1; fi
}

[[ $# -gt 0 ]] || { sed -n '2,12p' "$0"; exit 2; }
while [[ $# -gt 0 ]]; do
  cmd=$1; shift
  case "$cmd" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    topics)
      if [[ $# -gt 0 && "$1" == *.toml ]]; then topics "$1"; shift; else topics; fi ;;
    *) echo "unknown command $cmd (install | start | topics [CONFIG] | stop | status)" >&2; exit 2 ;;
  esac
done
