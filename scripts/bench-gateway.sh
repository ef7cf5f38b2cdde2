#!/usr/bin/env bash
# Load-tests the gateway alone on loopback: job submission through its whole path (validation and prompt
# cleaning, the Redis rate-limit script, the Redis job record, publish to RabbitMQ with a confirm) and
# GET /v1/queue. No worker runs; the jobs pile up in a namespace of the script's own, deleted at the end.
#
#   scripts/bench-gateway.sh                # 32 connections, 15 s per endpoint
#   CONCURRENCY=64 DURATION=30s scripts/bench-gateway.sh
#   SKIP_BUILD=1 scripts/bench-gateway.sh   # use the target/release/gateway already built
#
# Prints one table row per endpoint: requests per second, p50 and p99 latency, non-2xx answers.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

CONCURRENCY="${CONCURRENCY:-32}"
DURATION="${DURATION:-15s}"
THREADS="${THREADS:-2}"
PORT="${PORT:-18080}"
NS="bench-$$-$RANDOM"
WORK="$(mktemp -d)"

ensure_services
command -v wrk >/dev/null || apt_install wrk

if [ -z "${SKIP_BUILD:-}" ]; then
  log "building the gateway (release)"
  cargo build --release -p gateway --locked
fi

GATEWAY_PID=""
cleanup() {
  if [ -n "$GATEWAY_PID" ]; then
    kill "$GATEWAY_PID" 2>/dev/null || true
    wait "$GATEWAY_PID" 2>/dev/null || true
  fi
  for q in "$NS.jobs" "$NS.jobs.dead" "$NS.replies"; do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  redis-cli --scan --pattern "$NS:*" | xargs -r -n 500 redis-cli del >/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

log "starting the gateway on 127.0.0.1:$PORT, namespace $NS"
RUST_LOG=warn target/release/gateway \
  --listen "127.0.0.1:$PORT" --namespace "$NS" \
  --submit-rate-limit 1000000000/1s --read-rate-limit 1000000000/1s \
  --token-rate-limit 1000000000/1s --max-active-jobs-per-client 0 \
  >"$WORK/gateway.log" 2>&1 &
GATEWAY_PID=$!
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null || { cat "$WORK/gateway.log"; echo "gateway not ready" >&2; exit 1; }

# wrk's done() hook prints one machine-readable line per run.
cat >"$WORK/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local non2xx = summary.errors.status
  local failed = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %.0f %.2f %.2f %d %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, non2xx, failed))
end
LUA
cat "$WORK/report.lua" >"$WORK/submit.lua"
cat >>"$WORK/submit.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"prompt": "Hello,   world! How is the $weather today?", "parameters": {"max_new_tokens": 20}}'
LUA

bench() { # name path script (the name also names the raw output file)
  wrk -t"$THREADS" -c"$CONCURRENCY" -d2s -s "$3" "http://127.0.0.1:$PORT$2" >/dev/null # warm-up
  local line
  line="$(wrk -t"$THREADS" -c"$CONCURRENCY" -d"$DURATION" --latency -s "$3" "http://127.0.0.1:$PORT$2" | tee "$WORK/wrk-${2//\//_}.txt" | grep '^RESULT')"
  read -r _ rps p50 p99 non2xx failed <<<"$line"
  printf '| %-16s | %10s | %8s | %8s | %7s | %6s |\n' "$1" "$rps" "$p50" "$p99" "$non2xx" "$failed"
}

log "wrk: $THREADS threads, $CONCURRENCY connections, $DURATION per endpoint"
printf '| %-16s | %10s | %8s | %8s | %7s | %6s |\n' "endpoint" "req/s" "p50 ms" "p99 ms" "non-2xx" "errors"
printf '|%s|%s|%s|%s|%s|%s|\n' "------------------" "------------:" "---------:" "---------:" "--------:" "-------:"
bench "POST /v1/jobs" /v1/jobs "$WORK/submit.lua"
bench "GET /v1/queue" /v1/queue "$WORK/report.lua"
depth="$(curl -fs "http://127.0.0.1:$PORT/v1/queue")"
log "queue after the run: $depth"
