#!/usr/bin/env bash
# Starts and stops a local persona cluster: N processes of W workers each, on loopback.
#
#   scripts/cluster.sh start N W [CONFIG]   # CONFIG: a persona config file (default: the embedded one)
#   scripts/cluster.sh status               # every process's row of /v1/status
#   scripts/cluster.sh stop
#
# Process i listens for timely on 127.0.0.1:$((TIMELY_PORT + i)) and for HTTP on
# 127.0.0.1:$((HTTP_PORT + i)) (defaults 2101 and 8080). The layout goes to every process as
# PERSONA_CLUSTER_* environment overrides, so any config file works unchanged. Logs and pid
# files are in $DIR (default target/cluster): process-i.log, process-i.pid.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${DIR:-target/cluster}
TIMELY_PORT=${TIMELY_PORT:-2101}
HTTP_PORT=${HTTP_PORT:-8080}
BIN=${BIN:-target/release/persona}

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

start() {
  local n=$1 w=$2 config=${3:-}
  [[ "$n" =~ ^[1-9][0-9]*$ && "$w" =~ ^[1-9][0-9]*$ ]] || usage
  if ls "$DIR"/process-*.pid >/dev/null 2>&1; then
    echo "a cluster is already running from $DIR (scripts/cluster.sh stop first)" >&2
    exit 1
  fi
  if [ "$BIN" = target/release/persona ]; then cargo build --release --quiet; fi
  mkdir -p "$DIR"
  local addresses="" http="" workers=""
  for ((i = 0; i < n; i++)); do
    addresses+="${addresses:+,}\"127.0.0.1:$((TIMELY_PORT + i))\""
    http+="${http:+,}\"127.0.0.1:$((HTTP_PORT + i))\""
    workers+="${workers:+,}$w"
  done
  for ((i = 0; i < n; i++)); do
    PERSONA_CLUSTER_ADDRESSES="[$addresses]" PERSONA_CLUSTER_HTTP="[$http]" PERSONA_CLUSTER_WORKERS="[$workers]" \
      nohup "$BIN" run ${config:+--config "$config"} --process "$i" >"$DIR/process-$i.log" 2>&1 &
    echo $! >"$DIR/process-$i.pid"
  done
  # Ready once every process answers /readyz.
  for ((t = 0; t < 600; t++)); do
    local ready=0
    for ((i = 0; i < n; i++)); do
      if ! kill -0 "$(cat "$DIR/process-$i.pid")" 2>/dev/null; then
        echo "process $i exited; its log ($DIR/process-$i.log) ends:" >&2
        tail -5 "$DIR/process-$i.log" >&2
        stop
        exit 1
      fi
      curl -sf "http://127.0.0.1:$((HTTP_PORT + i))/readyz" >/dev/null && ready=$((ready + 1))
    done
    if [ "$ready" = "$n" ]; then
      echo "cluster of $n processes x $w workers ready: http://127.0.0.1:$HTTP_PORT .. :$((HTTP_PORT + n - 1)); logs in $DIR"
      return 0
    fi
    sleep 0.5
  done
  echo "cluster not ready after 300 s; logs in $DIR" >&2
  exit 1
}

stop() {
  local any=0
  for f in "$DIR"/process-*.pid; do
    [ -e "$f" ] || continue
    any=1
    kill "$(cat "$f")" 2>/dev/null || true
  done
  for f in "$DIR"/process-*.pid; do
    [ -e "$f" ] || continue
    local pid; pid=$(cat "$f")
    for ((t = 0; t < 100; t++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
  [ "$any" = 1 ] && echo "cluster stopped" || echo "no cluster running from $DIR"
}

status() {
  curl -sf "http://127.0.0.1:$HTTP_PORT/v1/status" | python3 -c '
import json, sys
s = json.load(sys.stdin)
for p in s["processes"]:
    print(json.dumps(p))
print("cluster ready:", s.get("cluster_ready"))'
}

case "${1:-}" in
  start) shift; [ $# -ge 2 ] || usage; start "$@" ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
