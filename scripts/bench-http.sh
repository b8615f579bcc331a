#!/usr/bin/env bash
# HTTP load benchmark: wrk (Debian package) sends GET /v1/users/{id} for random known users, with
# the read token, to `persona run` while it ingests a followed log at INGEST events/s. Prints
# wrk's requests/s and latency percentiles, then the ingest rate the engine kept up with.
#
#   scripts/bench-http.sh                       30k users, 300k events of history, 15 s of load
#   DURATION=30s CONNECTIONS=64 THREADS=1 INGEST=5000 WORKERS=2 HTTP_THREADS=1 scripts/bench-http.sh
#   RATE=20000 scripts/bench-http.sh            open loop at a fixed offered load, with oha
#                                               (installed from crates.io if missing); plain
#                                               wrk runs closed-loop, as fast as answers come
#   RATE=20000 REPEAT=5 scripts/bench-http.sh   five open-loop runs on one engine, then their median p99
#   WORKER_CPUS=0 HTTP_CPUS=1 scripts/bench-http.sh
#                                               engine.worker_cpus / http.cpus: the workers
#                                               (and the log writer) on CPU 0, the HTTP threads
#                                               and the load generator on CPU 1
#
# Everything runs on this machine (2 cores): wrk, the engine's workers, its HTTP thread and
# the log writer share them, so the figures are a floor for a dedicated server.
set -euo pipefail
cd "$(dirname "$0")/.."

USERS=${USERS:-30000}
EVENTS=${EVENTS:-300000}
DURATION=${DURATION:-15s}
WARMUP=${WARMUP:-5s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
INGEST=${INGEST:-2000}
WORKERS=${WORKERS:-2}
REPEAT=${REPEAT:-1}
WORKER_CPUS=${WORKER_CPUS:-}
HTTP_CPUS=${HTTP_CPUS:-}
# The load generator runs where the HTTP threads do (GEN_CPUS: elsewhere, "" = anywhere), the
# log writer where the workers do.
GEN_CPUS=${GEN_CPUS-$HTTP_CPUS}
gen=(); writer_cpu=()
[[ -n "$GEN_CPUS" ]] && gen=(taskset -c "$GEN_CPUS")
[[ -n "$WORKER_CPUS" ]] && writer_cpu=(taskset -c "$WORKER_CPUS")
DIR=target/bench/http
mkdir -p "$DIR"

if ! command -v wrk >/dev/null; then
  sudo_cmd=""; [[ $(id -u) -eq 0 ]] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq wrk
fi
if [[ -n "${RATE:-}" ]] && ! command -v oha >/dev/null; then
  # oha (crates.io): an open-loop HTTP load generator; Debian has no wrk2.
  cargo install oha --version 1.16.0 --locked --no-default-features --features native-tls
fi
cargo build --release --quiet
BIN=target/release/persona
now=$(date +%s%3N)
# History: the last two days; live events: stamped from now on, one file appended gradually.
"$BIN" generate --out "$DIR/history.jsonl" --catalog "$DIR/catalog.jsonl" --events "$EVENTS" \
  --users "$USERS" --span 2d --start-ms $((now - 2 * 86400000)) --invalid 0 >/dev/null
live_s=$((90 + 30 * REPEAT))   # enough appended events to outlast every run
"$BIN" generate --out "$DIR/live-src.jsonl" --events $((INGEST * live_s)) --users "$USERS" \
  --span "${live_s}s" --start-ms "$now" --invalid 0 --late 0 --seed 11 >/dev/null
cp "$DIR/history.jsonl" "$DIR/events.jsonl"

token=bench-$RANDOM$RANDOM
PERSONA_ENGINE_WORKERS=$WORKERS PERSONA_HTTP_LISTEN=127.0.0.1:0 PERSONA_HTTP_READ_TOKEN=$token \
  PERSONA_SOURCE_PATH="$DIR/events.jsonl" PERSONA_SOURCE_CATALOG_PATH="$DIR/catalog.jsonl" \
  PERSONA_SOURCE_DEAD_LETTER_PATH="$DIR/dead.jsonl" PERSONA_TRIGGERS_SINK=none \
  PERSONA_ENGINE_ERASURE_LOG="$DIR/erasures.jsonl" RUST_LOG=warn,persona=info \
  PERSONA_ENGINE_WORKER_CPUS="[$WORKER_CPUS]" PERSONA_HTTP_CPUS="[$HTTP_CPUS]" \
  PERSONA_HTTP_THREADS=${HTTP_THREADS:-${PERSONA_HTTP_THREADS:-2}} \
  "$BIN" run 2>"$DIR/persona.log" &
pid=$!
writer=
cleanup() {
  [[ -n "$writer" ]] && kill "$writer" 2>/dev/null || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
trap cleanup EXIT
base=""
for _ in $(seq 1 600); do
  base=$(grep -o 'listening on http://[0-9.:]*' "$DIR/persona.log" | head -1 | sed 's/listening on //' || true)
  [[ -n "$base" ]] && curl -sf "$base/readyz" >/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$DIR/persona.log"; exit 1; }
  sleep 0.1
done
echo "persona ($WORKERS workers) ready at $base with $EVENTS events of $USERS users"

# Ingest: append INGEST lines a second, in tenths of a second.
${writer_cpu[@]+"${writer_cpu[@]}"} python3 - "$DIR/live-src.jsonl" "$DIR/events.jsonl" "$INGEST" <<'PY' &
import sys, time
src, dst, rate = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = open(src).readlines()
step = max(1, rate // 10)
with open(dst, "a") as out:
    start = time.time()
    for i in range(0, len(lines), step):
        out.writelines(lines[i:i + step]); out.flush()
        time.sleep(max(0.0, start + (i // step + 1) / 10 - time.time()))
PY
writer=$!
sleep 1
cat > "$DIR/users.lua" <<LUA
local users = $USERS
wrk.headers["Authorization"] = "Bearer $token"
request = function()
  return wrk.format("GET", "/v1/users/u" .. math.random(0, users - 1))
end
LUA
python3 -c "
import random, sys
random.seed(1)
print('\n'.join(f'$base/v1/users/u{random.randrange($USERS)}' for _ in range(100000)))
" >"$DIR/urls.txt"
# Warm-up, not measured: the first read of each user waits for its worker (which publishes
# the profile for the reads after it), and the first seconds after catching up hold the
# arrangements' large merges.
${gen[@]+"${gen[@]}"} wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" -s "$DIR/users.lua" "$base" >/dev/null
curl -s -H "Authorization: Bearer $token" "$base/metrics" >"$DIR/metrics-before.txt"
before=$(curl -s -H "Authorization: Bearer $token" "$base/metrics" | awk '/^persona_events_in_total/ {print $2}')
start=$(date +%s.%N)
if [[ -n "${RATE:-}" ]]; then
  # Open loop: requests are sent on a schedule of RATE a second whatever the answers do, and
  # each latency counts from its scheduled start (no coordinated omission).
  # First the floor: the same load on /healthz (no engine work), to show what the generator
  # sharing the cores adds by itself.
  echo "== floor: GET /healthz at $RATE/s"
  ${gen[@]+"${gen[@]}"} oha --no-tui -z "$DURATION" -c "$CONNECTIONS" -q "$RATE" --latency-correction "$base/healthz" |
    grep -E "Requests/sec|in [0-9.]+ ms" | grep -E "sec|50.00|90.00|99.00|99.90"
  # REPEAT runs back to back: this VM's tails vary by an order of magnitude from run to run,
  # so the median of several is the figure to compare.
  for run in $(seq 1 "$REPEAT"); do
    echo "== GET /v1/users/{id} at $RATE/s (run $run of $REPEAT)"
    ${gen[@]+"${gen[@]}"} oha --no-tui -z "$DURATION" -c "$CONNECTIONS" -q "$RATE" --latency-correction \
      -H "Authorization: Bearer $token" --urls-from-file "$DIR/urls.txt" | tee "$DIR/oha.$run.out"
  done
  if ((REPEAT > 1)); then
    python3 - "$DIR" "$REPEAT" <<'PY'
import re, statistics, sys
d, n = sys.argv[1], int(sys.argv[2])
p99 = [float(re.search(r"99.00% in ([0-9.]+) ms", open(f"{d}/oha.{i}.out").read())[1]) for i in range(1, n + 1)]
print("p99 of each run: " + ", ".join(f"{v:.2f}" for v in p99) + f" ms; median {statistics.median(p99):.2f} ms")
PY
  fi
else
  ${gen[@]+"${gen[@]}"} wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$DIR/users.lua" "$base"
fi | tee "$DIR/wrk.out"
end=$(date +%s.%N)
after=$(curl -s -H "Authorization: Bearer $token" "$base/metrics" | awk '/^persona_events_in_total/ {print $2}')
python3 -c "print(f'ingested during the run: {($after - $before) / ($end - $start):.0f} events/s (offered {$INGEST})')"
# The server's own view: time from a request's routing to its answer, by histogram bucket.
curl -s -H "Authorization: Bearer $token" "$base/metrics" >"$DIR/metrics.txt"
python3 - "$DIR/metrics-before.txt" "$DIR/metrics.txt" <<'PY'
import re, sys
def buckets(path):
    out = []
    for line in open(path):
        m = re.match(r'persona_query_duration_seconds_bucket\{le="([^"]+)",route="profile"\} (\d+)', line)
        if m:
            out.append((float("inf") if m[1] == "+Inf" else float(m[1]), int(m[2])))
    return out
before, after = buckets(sys.argv[1]), buckets(sys.argv[2])
if after:
    during = [(le, n - dict(before).get(le, 0)) for le, n in after]
    total = during[-1][1]
    def pct(p):
        return next(le for le, n in during if n >= p * total)
    print(f"server-side, {total} profile answers (routing to reply, histogram bucket bounds): " + ", ".join(
        f"p{p * 100:g} <= {pct(p) * 1000:.2f} ms" for p in (0.5, 0.9, 0.99, 0.999)))
PY
status=$(curl -s -H "Authorization: Bearer $token" "$base/v1/users/u1" -o /dev/null -w '%{http_code}')
echo "a profile after the run: HTTP $status"
