#!/usr/bin/env bash
# The Redis peer of scripts/bench.sh: "a consumer updating a Redis hash per user".
#
#   scripts/peers/redis.sh LOG OUT [LOADERS]
#
# Installs redis-server (Debian's, 7.0) if missing and a Python venv with redis-py + hiredis +
# orjson (requirements-redis.txt) under target/bench/venv-redis, starts a private redis-server
# with no persistence on $REDIS_PORT (default 6390), loads LOG with redis_features.py
# (LOADERS processes, default 1: see the note in redis_features.py), dumps every user to OUT,
# prints Redis's memory and ends with one line:
#   redis: <lines> lines, <users> users, elapsed <s> s, redis used_memory <bytes>, redis peak RSS <KiB> KiB
# elapsed is the loader's wall clock (load + dump); used_memory is taken after the dump.
# `--setup` only installs redis-server and the venv (scripts/bench.sh runs it before timing).
set -euo pipefail

SETUP_ONLY=0
if [ "${1:-}" = --setup ] && [ $# -eq 1 ]; then
  SETUP_ONLY=1
elif [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 LOG OUT [LOADERS] | $0 --setup" >&2
  exit 2
fi
LOG=${1:-}
OUT=${2:-}
LOADERS=${3:-1}
PORT=${REDIS_PORT:-6390}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENV=${REDIS_VENV:-$ROOT/target/bench/venv-redis}
REQS=$HERE/requirements-redis.txt

[ "$SETUP_ONLY" = 1 ] || [ -r "$LOG" ] || { echo "redis.sh: cannot read $LOG" >&2; exit 2; }

SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  echo "redis.sh: installing redis-server with apt" >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null ||
    { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
fi

if [ ! -x "$VENV/bin/python" ] || ! cmp -s "$REQS" "$VENV/requirements-redis.txt"; then
  echo "redis.sh: creating $VENV" >&2
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQS"
  cp "$REQS" "$VENV/requirements-redis.txt"
fi
[ "$SETUP_ONLY" = 1 ] && exit 0

if redis-cli -p "$PORT" ping >/dev/null 2>&1; then
  echo "redis.sh: something already answers on port $PORT; set REDIS_PORT" >&2
  exit 1
fi

WORK=$(mktemp -d)
REDIS_PID=
LOADER_PID=
cleanup() {
  if [ -n "$LOADER_PID" ] && kill -0 "$LOADER_PID" 2>/dev/null; then
    pkill -TERM -P "$LOADER_PID" 2>/dev/null || true  # the python under /usr/bin/time
    kill "$LOADER_PID" 2>/dev/null || true
  fi
  if [ -n "$REDIS_PID" ] && kill -0 "$REDIS_PID" 2>/dev/null; then
    kill "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
  --dir "$WORK" --logfile "$WORK/redis.log" &
REDIS_PID=$!
for _ in $(seq 100); do
  redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
  kill -0 "$REDIS_PID" 2>/dev/null || { cat "$WORK/redis.log" >&2; exit 1; }
  sleep 0.1
done
redis-cli -p "$PORT" ping >/dev/null
redis-cli -p "$PORT" flushall >/dev/null

TIME=()
[ -x /usr/bin/time ] && TIME=(/usr/bin/time -f 'loader: %e s wall, %U s user, %S s sys, peak RSS %M KiB' -o "$WORK/time")
start=$(date +%s.%N)
# In the background and waited for, so that a signal stops it (and Redis) at once.
"${TIME[@]}" "$VENV/bin/python" "$HERE/redis_features.py" \
  --events "$LOG" --out "$OUT" --port "$PORT" --loaders "$LOADERS" >"$WORK/summary" &
LOADER_PID=$!
wait "$LOADER_PID"
end=$(date +%s.%N)
LOADER_PID=
cat "$WORK/summary"
[ -f "$WORK/time" ] && cat "$WORK/time"

info() { redis-cli -p "$PORT" info "$1" | tr -d '\r' | sed -n "s/^$2:\(.*\)/\1/p"; }
used=$(info memory used_memory)
peak=$(info memory used_memory_peak)
cpu_user=$(info cpu used_cpu_user)
cpu_sys=$(info cpu used_cpu_sys)
rss=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$REDIS_PID/status")
evalsha=$(redis-cli -p "$PORT" info commandstats | tr -d '\r' |
  sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\),usec=[0-9]*,usec_per_call=\([0-9.]*\).*/\1 calls, \2 us per call/p')
echo "redis-server: used_memory_peak $peak bytes, used_memory $used bytes, cpu ${cpu_user} s user ${cpu_sys} s sys, EVALSHA ${evalsha:-0 calls}"
lines=$(sed -n 's/^summary: lines \([0-9]*\) .*/\1/p' "$WORK/summary")
users=$(sed -n 's/^summary: .* users \([0-9]*\) .*/\1/p' "$WORK/summary")
elapsed=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
echo "redis: $lines lines, $users users, elapsed $elapsed s, redis used_memory $used, redis peak RSS $rss KiB"
